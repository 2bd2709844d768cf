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

from promptbake import cli, export, files
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


# -- q4_1, and the LoRA beside the base as a llama.cpp adapter -----------------------------------


@pytest.fixture(scope="module")
def with_adapter(baked_dir, tmp_path_factory):
    """The tiny bake at q4_1 with the export's default for 4 bits: the LoRA in adapter.gguf."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(gguf.TOP1_FLOOR, "q4_1", 0.0)  # near-ties everywhere on a random model
        return export_baked(baked_dir, tmp_path_factory.mktemp("gguf") / "q4_1",
                            format="gguf", quantize="q4_1")


@pytest.fixture(scope="module")
def f32_with_adapter(baked_dir, tmp_path_factory):
    return export_baked(baked_dir, tmp_path_factory.mktemp("gguf") / "f32-adapter",
                        format="gguf", gguf_lora="adapter")


def test_q4_1_stores_4_bit_blocks_with_a_minimum(with_adapter, baked_dir):
    from promptbake import load_baked
    from promptbake.export import merge

    manifest = with_adapter.manifest
    assert manifest["precision"] == "q4_1" and manifest["parity"]["passed"]
    assert manifest["tensor_types"] == {"Q8_0": 1, "Q4_1": 14, "F32": 5}
    stored = tensors(with_adapter.file)["blk.0.ffn_up.weight"]
    weights = gguf_py.dequantize(stored.data, stored.tensor_type)
    base = merge(load_baked(baked_dir), 0.0)
    original = base.model.layers[0].mlp.up_proj.weight.detach().numpy().reshape(-1, 32)
    spread = original.max(-1, keepdims=True) - original.min(-1, keepdims=True)
    # a step of a fifteenth of each block's range, starting at its minimum: half a step at most
    assert (np.abs(weights.reshape(-1, 32) - original) <= spread / 30 + 1e-3).all()


def test_at_4_bits_the_lora_is_a_llama_cpp_adapter_beside_the_base(with_adapter, baked_dir):
    from promptbake import load_baked
    from promptbake.export import merge, merging

    manifest = with_adapter.manifest
    assert manifest["lora"] == "adapter"
    assert sorted(p.name for p in with_adapter.path.iterdir()) == [
        files.MARKER, "Modelfile", "adapter.gguf", "manifest.json", "model.gguf"]
    assert (with_adapter.path / "Modelfile").read_text().splitlines()[:2] == [
        "FROM ./model.gguf", "ADAPTER ./adapter.gguf"]
    sizes = manifest["file_bytes"]
    assert manifest["bytes"] == sizes["model.gguf"] + sizes["adapter.gguf"]
    assert manifest["adapter"]["layers"] == 8 and manifest["adapter"]["ranks"] == [4]

    baked = load_baked(baked_dir)
    # model.gguf holds the base weights, unmerged: quantised exactly as the base would be
    base = merge(baked, 0.0)
    stored = tensors(with_adapter.file)["blk.1.attn_v.weight"]
    want = gguf_py.quants.quantize(base.model.layers[1].self_attn.v_proj.weight.detach().numpy(),
                                   gguf_py.GGMLQuantizationType.Q4_1)
    assert np.array_equal(np.asarray(stored.data).reshape(want.shape), want)

    # adapter.gguf: llama.cpp's names and shapes, alpha 0 (the scaling is in lora_b), and B's
    # rows of the query and key in llama.cpp's rotary order
    reader = gguf_py.GGUFReader(with_adapter.adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 0.0
    found = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(found) == 16 and "blk.0.attn_output.weight.lora_a" in found
    factors = merging.lora_factors(baked.model, 1.0)
    a = factors["model.layers.1.self_attn.q_proj"][0]
    assert found["blk.1.attn_q.weight.lora_a"].shape == (4, 64)
    np.testing.assert_array_equal(found["blk.1.attn_q.weight.lora_a"], a.T)
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    for name, module in (("attn_q", "q_proj"), ("attn_k", "k_proj")):  # 4 heads, 2 KV heads
        b = factors[f"model.layers.1.self_attn.{module}"][1]
        lora_b = found[f"blk.1.{name}.weight.lora_b"]
        assert not np.array_equal(lora_b, b.T)
        np.testing.assert_array_equal(
            LlamaTensorProcessor(config).process(lora_b, f"blk.1.{name}.weight").weights, b.T)
    np.testing.assert_array_equal(found["blk.1.attn_v.weight.lora_b"],  # no rotary: as it is
                                  factors["model.layers.1.self_attn.v_proj"][1].T)


def test_the_adapter_read_back_gives_the_merged_bake(f32_with_adapter, baked_dir):
    from promptbake import load_baked
    from promptbake.export import merge

    manifest = f32_with_adapter.manifest
    assert manifest["lora"] == "adapter" and manifest["tensor_types"] == {"F32": 20}
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-3  # the fp32 criterion
    model, _ = f32_with_adapter.load()
    merged = merge(load_baked(baked_dir))
    ids = torch.tensor([[1, 50, 700, 9000, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)
    bare, _ = gguf.load(f32_with_adapter.file)  # the base alone: the adapter carries the bake
    with torch.no_grad():
        assert (bare(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() > 0.1
    kept = manifest["held_out_kl"]
    assert kept["retention"] == pytest.approx(1.0, abs=1e-3)


def test_llama_cpp_applies_the_adapter_as_the_merged_bake(f32_with_adapter, baked_dir):
    """The generic consumer itself: llama.cpp (llama-cpp-python) loads model.gguf with
    adapter.gguf and computes the merged bake's logits; without the adapter it does not."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from promptbake import load_baked
    from promptbake.export import merge

    ids = [1, 50, 700, 9000, 4, 321, 17]
    with torch.no_grad():
        want = merge(load_baked(baked_dir))(input_ids=torch.tensor([ids])).logits[0].numpy()

    def logits(**lora):
        f32 = llama_cpp.GGML_TYPE_F32  # an f16 KV cache would move the logits by ~1e-2
        llm = llama_cpp.Llama(model_path=str(f32_with_adapter.file), n_ctx=64, n_threads=1,
                              type_k=f32, type_v=f32, logits_all=True, verbose=False, **lora)
        try:
            llm.eval(ids)
            return np.array(llm.scores[:len(ids)], dtype=np.float32)
        finally:
            llm.close()

    assert np.abs(logits(lora_path=str(f32_with_adapter.adapter)) - want).max() < 2e-3
    assert np.abs(logits() - want).max() > 0.1


def test_cli_exports_q4_1_with_the_adapter_or_merged(baked_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(gguf.TOP1_FLOOR, "q4_1", 0.0)
    out = tmp_path / "adapter"
    assert cli.main(["export", str(baked_dir), "--out", str(out), "--format", "gguf",
                     "--quantize", "q4_1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "adapter.gguf (the LoRA, a llama.cpp adapter)" in printed
    assert f"--lora {out / 'adapter.gguf'}" in printed and "with the adapter" in printed
    merged = tmp_path / "merged"
    assert cli.main(["export", str(baked_dir), "--out", str(merged), "--format", "gguf",
                     "--quantize", "q4_1", "--gguf-lora", "merge", "--quiet"]) == 0
    assert "--lora" not in capsys.readouterr().out
    assert json.loads((merged / "manifest.json").read_text())["lora"] == "merge"
    assert not (merged / "adapter.gguf").exists()
    assert "ADAPTER" not in (merged / "Modelfile").read_text()
    assert export.check_gguf_lora("gguf", "q4_0", None) == "merge"  # as before the adapter
    assert export.check_gguf_lora("gguf", "q4_1", None) == "adapter"


def test_gguf_lora_is_refused_for_another_format(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "no-bake"), "--out", str(out), "--format", "onnx",
                     "--gguf-lora", "adapter"]) == 2
    assert "--gguf-lora applies to --format gguf" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="gguf_lora='beside': choose one of merge, adapter"):
        export_baked(tmp_path / "no-bake", out, format="gguf", gguf_lora="beside")


def test_a_layer_an_adapter_cannot_hold_is_named_before_writing(tiny, tokenizer, tmp_path):
    head = (np.zeros((64, 2), np.float32), np.zeros((2, tiny.config.vocab_size), np.float32))
    with pytest.raises(ValueError, match="adapts lm_head.*--gguf-lora merge"):
        export_gguf(tiny, tokenizer, tmp_path / "out",
                    adapter=gguf.Adapter(tiny, {"lm_head": head}))
    assert list(tmp_path.iterdir()) == []


def test_a_model_file_is_no_adapter(f32, tiny):
    with pytest.raises(ValueError, match="no llama.cpp LoRA adapter"):
        gguf.adapter_deltas(f32.file, tiny)


def test_q4_1_is_the_default_model_s_own_file(smollm2_dir):
    """The default model ships as llama.cpp's Q4_1 (its embedding Q8_0): written at q4_1, every
    quantised tensor is that file's, byte for byte, so the 4-bit base loses nothing and the
    bake, beside it in adapter.gguf, is kept whole."""
    from promptbake import models

    model, _, _ = models.load(smollm2_dir)
    original = tensors(models.default_gguf())
    state = model.state_dict()
    planned = gguf._plan(model, "q4_1")
    assert {t.name: t.qtype for t in planned} == {n: t.tensor_type for n, t in original.items()}
    for tensor in planned:
        if tensor.qtype != gguf_py.GGMLQuantizationType.F32:
            mine = gguf._stored(tensor, state[tensor.key], model.config)
            assert np.array_equal(mine, np.asarray(original[tensor.name].data).reshape(
                mine.shape)), tensor.name
