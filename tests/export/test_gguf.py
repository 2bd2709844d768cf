"""The GGUF export: a file transformers' GGUF loader rebuilds (model and tokenizer) on its own,
checked before it is written; quantised files record their parity; bad input is refused.

Each export reads its file back (~10 s on the tiny model, most of it parsing SmolLM2's 49k tokens
and merges), so the exports are made once per module and shared.
"""

import json

import gguf as gguf_py
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from promptbake import cli, files
from promptbake.export import ParityError, UnsupportedArchitecture, export_baked, export_gguf, gguf

TEXTS = ["Ahoy! How many 12345 doubloons, matey?", "naïve café 東京 🙂\n\n  spaced  out",
         "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def f32(tiny, tokenizer, tmp_path_factory):
    return export_gguf(tiny, tokenizer, tmp_path_factory.mktemp("gguf") / "f32")


@pytest.fixture(scope="module")
def q4_0(tiny, tokenizer, tmp_path_factory):
    # A randomly initialised model's next token is a near-tie almost everywhere (logits of
    # std ~1.6 over 49k tokens), so 4-bit weights change most choices: no floor here; the
    # numbers are recorded and the weights are checked against the originals below.
    return export_gguf(tiny, tokenizer, tmp_path_factory.mktemp("gguf") / "q4_0",
                       quantize="q4_0", top1_floor=0.0)


def tensors(path):
    return {t.name: t for t in gguf_py.GGUFReader(path).tensors}


def test_f32_round_trip_gives_the_same_logits_and_tokens(f32, tiny, tokenizer):
    model, reloaded = f32.load()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        want = tiny(input_ids=torch.tensor([ids])).logits
        got = model(input_ids=torch.tensor([ids])).logits
    # The weights are stored exactly; rms_norm_eps is a float32 in GGUF (1e-6 -> 9.9999999e-7).
    assert (got - want).abs().max() < 1e-4
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (tokenizer.bos_token_id,
                                                              tokenizer.eos_token_id)


def test_f32_manifest_records_the_checks(f32):
    manifest = json.loads((f32.path / "manifest.json").read_text())
    assert manifest["kind"] == "gguf" and manifest["precision"] == "f32"
    assert manifest["bytes"] == f32.file.stat().st_size and f32.file.name == "model.gguf"
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_diff"] < 1e-3
    assert manifest["parity"]["greedy_identical"] == manifest["parity"]["contexts"]
    assert manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["tokenizer_parity"]["passed"]
    assert manifest["tokenizer"]["pre"] == "gpt-2" and manifest["tensor_types"] == {"F32": 20}
    assert files.read_marker(f32.path)["kind"] == "gguf"
    assert (f32.path / "Modelfile").read_text().startswith("FROM ./model.gguf\n")


def test_tied_head_and_rope_rows_are_what_llama_cpp_expects(f32, tiny):
    found = tensors(f32.file)
    assert "output.weight" not in found and "token_embd.weight" in found  # tied
    config = {"num_attention_heads": tiny.config.num_attention_heads,
              "num_key_value_heads": tiny.config.num_key_value_heads}
    attention = tiny.model.layers[1].self_attn
    for name, weight in (("attn_q", attention.q_proj.weight), ("attn_k", attention.k_proj.weight)):
        stored = np.asarray(found[f"blk.1.{name}.weight"].data)
        assert not np.array_equal(stored, weight.detach().numpy())  # llama.cpp's row order
        back = LlamaTensorProcessor(config).process(stored, f"blk.1.{name}.weight").weights
        assert np.array_equal(back, weight.detach().numpy())  # and transformers undoes it


def test_q4_0_records_parity_and_stores_4_bit_blocks(q4_0, f32, tiny):
    manifest = q4_0.manifest
    assert manifest["precision"] == "q4_0" and manifest["parity"]["passed"]
    assert manifest["parity"]["criterion"] == "top-1 agreement with torch fp32 >= 0.0"
    for key in ("max_abs_logit_diff", "top1_agreement", "kl_per_token", "greedy_identical"):
        assert key in manifest["parity"]
    # the embedding (the tied head) stays 8-bit, norms f32, every other matrix 4-bit
    assert manifest["tensor_types"] == {"Q8_0": 1, "Q4_0": 14, "F32": 5}
    assert manifest["bytes"] < f32.manifest["bytes"] / 2  # the 8-bit embedding dominates
    stored = tensors(q4_0.file)["blk.0.ffn_up.weight"]
    weights = gguf_py.dequantize(stored.data, stored.tensor_type)
    original = tiny.model.layers[0].mlp.up_proj.weight.detach().numpy()
    blocks = np.abs(original).reshape(-1, 32).max(-1, keepdims=True)
    assert (np.abs(weights - original).reshape(-1, 32) <= blocks / 8 + 1e-6).all()


def test_cli_exports_a_bake_as_q8_0(baked_dir, tmp_path, capsys, monkeypatch):
    # The tiny random model agrees on ~90% of top-1 choices at q8_0 (near-ties everywhere);
    # SmolLM2-135M agrees on all of them. Lower the floor for this model only.
    monkeypatch.setitem(gguf.TOP1_FLOOR, "q8_0", 0.5)
    out = tmp_path / "gguf"
    assert cli.main(["export", str(baked_dir), "--out", str(out), "--format", "gguf",
                     "--quantize", "q8_0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "GGUF q8_0" in printed and "parity" in printed and "ollama create" in printed
    assert "of the bake's KL reduction" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "q8_0" and manifest["tensor_types"]["Q8_0"] == 15
    assert manifest["source"]["bake"] == str(baked_dir.resolve())
    assert manifest["source"]["strength"] == 1.0
    assert 0.5 <= manifest["parity"]["top1_agreement"] <= 1.0
    kept = manifest["held_out_kl"]  # measured on the model read back from the file
    assert kept["gguf"]["per_token"] >= 0 and kept["base"]["per_token"] > 0
    assert set(kept["reduction"]) == {"gguf", "baked"} and np.isfinite(kept["retention"])
    assert sorted(p.name for p in out.iterdir()) == [
        files.MARKER, "Modelfile", "manifest.json", "model.gguf"]
    assert cli.main(["export", str(baked_dir), "--out", str(out), "--format", "gguf"]) == 2
    assert "earlier gguf export" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf", "--quantize", "int8"], "int8 is the ONNX export's: use --format onnx"),
    (["--format", "onnx", "--quantize", "q4_0"], "q4_0 is the GGUF export's: use --format gguf"),
    (["--format", "gguf", "--prune", "0.5"], "--prune applies to the ONNX export"),
    (["--format", "safetensors", "--quantize", "q8_0"], "apply to the ONNX and GGUF exports"),
])
def test_cli_refuses_a_quantization_of_another_format(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "no-bake"), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_cli_help_explains_gguf(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--format gguf" in text and "q8_0" in text and "q4_0" in text and "Ollama" in text


def test_a_gguf_export_never_replaces_the_bake(baked_dir, file_hashes):
    before = file_hashes(baked_dir)
    for out in (baked_dir, baked_dir / "served"):
        with pytest.raises(ValueError, match="the directory it is made from"):
            export_baked(baked_dir, out, format="gguf", quantize="q8_0", overwrite=True)
    assert file_hashes(baked_dir) == before


def test_unsupported_architecture_is_named_before_writing(tokenizer, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(UnsupportedArchitecture, match="'gpt2' model to GGUF.*supports llama"):
        export_gguf(gpt2, tokenizer, tmp_path / "out")
    biased = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, attention_bias=True))
    with pytest.raises(ValueError, match="attention_bias"):
        export_gguf(biased, tokenizer, tmp_path / "out")
    with pytest.raises(ValueError, match="int8 is the ONNX export's"):
        export_gguf(biased, tokenizer, tmp_path / "out", quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_gguf_cannot_hold_is_named_before_writing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "ahoy": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="WordLevel.*byte-level BPE"):
        export_gguf(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_parity_check_writes_nothing(f32, tiny, tokenizer, tmp_path, monkeypatch,
                                              file_hashes):
    import shutil

    earlier = tmp_path / "export"
    shutil.copytree(f32.path, earlier)
    before = file_hashes(earlier)
    monkeypatch.setitem(gguf.TOP1_FLOOR, "f16", 1.01)  # unreachable
    with pytest.raises(ParityError, match=r"f16\) does not match.*>= 1.01") as caught:
        export_gguf(tiny, tokenizer, earlier, quantize="f16", overwrite=True)
    assert caught.value.report["top1_agreement"] <= 1.0
    assert file_hashes(earlier) == before  # the earlier export is kept as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left


def test_the_default_model_comes_back_as_llama_cpp_wrote_it(smollm2_dir):
    """The default model is converted from llama.cpp's own GGUF of SmolLM2: written back, its
    tensors are that file's, bit for bit (names, shapes, and the rope row order)."""
    from promptbake import models

    model, _, _ = models.load(smollm2_dir)
    original = tensors(models.default_gguf())
    planned = {t.name: t for t in gguf._plan(model, "f32")}
    assert planned.keys() == original.keys()  # no output.weight: the head is tied in both
    state = model.state_dict()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight",
                 "output_norm.weight"):
        mine = gguf._stored(planned[name], state[planned[name].key], model.config)
        theirs = gguf_py.dequantize(original[name].data, original[name].tensor_type)
        assert np.array_equal(mine, theirs), name
