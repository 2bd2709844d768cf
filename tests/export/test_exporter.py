"""Merge and ONNX export on tiny random models (a 2-layer Llama with SmolLM2's tokenizer, and a
2-layer GPT-2): merging equals the adapter at each strength, the exported graph matches torch
in prefill and cached decode, onnxruntime generation equals transformers' (greedy, batches,
EOS, seeded sampling), int8 and packed pruned weights, and failures that leave nothing behind."""

import hashlib
import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM)

from promptbake import files
from promptbake.export import (OnnxLM, OnnxLoadError, ParityError, Tolerances,
                               UnsupportedArchitecture, export_baked, export_model, export_onnx,
                               graph, parity, runtime, save_merged, smooth, sparse)
from promptbake.models import ModelError

# Random tiny models have near-flat logits, so int8 rounding flips many argmaxes (on the real
# model top-1 agreement is ~0.99, see the export report): the test only needs a sane bound.
LENIENT_INT8 = Tolerances(int8_top1=0.5, contexts=3, steps=16)
FAST = Tolerances(contexts=3, steps=16)


def prompts(tokenizer, count=3):
    return parity.default_prompts(tokenizer, count=count)


def hf_greedy(model, ids, steps):
    out = model.generate(torch.tensor([ids]),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def llama(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_export(llama, tokenizer, tmp_path_factory):
    return export_onnx(llama, tokenizer, tmp_path_factory.mktemp("onnx") / "llama",
                       tolerances=FAST)


@pytest.fixture(scope="module")
def lm(llama_export):
    return OnnxLM(llama_export.path)


# -- merge --------------------------------------------------------------------------------------


# -- export and parity --------------------------------------------------------------------------


def test_export_passes_checker_and_parity(llama_export):
    path, manifest = llama_export.path, llama_export.manifest
    onnx.checker.check_model(str(path / "model.onnx"))
    report = manifest["parity"]
    assert report["passed"] and report["greedy_identical"] + len(report["greedy_ties"]) == 3
    assert report["max_abs_logit_diff"] < 1e-3 and report["top1_agreement"] == 1.0
    assert json.loads((path / "manifest.json").read_text()) == manifest
    assert manifest["precision"] == "fp32" and manifest["architecture"]["tied_head"]
    # the tied embedding is stored once: about vocab x hidden fp32, not twice that
    assert manifest["bytes"] < 1.2 * 49152 * 64 * 4
    assert (path / "tokenizer.json").is_file()
    session = OnnxLM(path).session
    names = {i.name for i in session.get_inputs()}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.1.value"} <= names
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]


def test_gpt2_exports_and_generates_like_transformers(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4,
                                       n_positions=512, initializer_range=0.2)).eval()
    found = export_onnx(model, tokenizer, tmp_path / "gpt2", tolerances=FAST)
    assert found.manifest["parity"]["passed"]
    assert found.manifest["architecture"]["model_type"] == "gpt2"
    lm = OnnxLM(found.path)
    batch = prompts(tokenizer, 2)
    run = lm.generate(batch, 12, eos_token_ids=())
    assert run.tokens == [hf_greedy(model, ids, 12) for ids in batch]
    # GPT-2's Conv1D layers trace to Gemm: int8 rewrites them as MatMul to quantise them
    quantized = export_onnx(model, tokenizer, tmp_path / "gpt2-int8", quantize="int8",
                            tolerances=LENIENT_INT8)
    assert quantized.manifest["int8"]["quantized_matmuls"] == 2 * 4 + 1
    assert quantized.manifest["int8"]["tied_head_shared"]
    assert quantized.manifest["bytes"] < 0.35 * found.manifest["bytes"]


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_transformers(llama, tokenizer, lm, batch):
    chosen = prompts(tokenizer, 3)[:batch]
    if batch == 2:
        chosen = [chosen[0], chosen[1][: len(chosen[1]) // 2]]  # different lengths: left padding
        assert len(chosen[0]) != len(chosen[1])
    run = lm.generate(chosen, 20, eos_token_ids=())
    assert run.tokens == [hf_greedy(llama, ids, 20) for ids in chosen]
    assert run.prefill_seconds > 0 and len(run.step_seconds) == 19


def plain_onnxruntime_greedy(path, ids, steps):
    """Greedy decoding as a generic consumer writes it: plain onnxruntime, the usual inputs
    (input_ids, attention_mask, position_ids, past_key_values.N.key/value), no logits_to_keep,
    the last position's logits read from [batch, seq, vocab]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "model.onnx"))
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    outputs = [o.name for o in session.get_outputs()]
    heads, dim = inputs[past_names[0]].shape[1], inputs[past_names[0]].shape[3]
    past = [np.zeros((1, heads, 0, dim), np.float32) for _ in past_names]
    tokens, new, position = list(ids), list(ids), 0
    for _ in range(steps):
        feeds = {"input_ids": np.array([new], np.int64),
                 "attention_mask": np.ones((1, len(tokens)), np.int64),
                 "position_ids": np.arange(position, position + len(new), dtype=np.int64)[None]}
        logits, *past = session.run(outputs, {**feeds, **dict(zip(past_names, past))})
        assert logits.shape[1] == len(new)  # every position, as a generic loop expects
        position += len(new)
        new = [int(logits[0, -1].argmax())]
        tokens += new
    return tokens[len(ids):]


def test_a_plain_onnxruntime_loop_runs_the_export(llama, tokenizer, llama_export):
    import onnxruntime as ort

    session = ort.InferenceSession(str(llama_export.path / "model.onnx"))
    required = {i.name for i in session.get_inputs()}
    assert "logits_to_keep" not in required  # optional: an overridable initializer
    assert "logits_to_keep" in {i.name for i in session.get_overridable_initializers()}
    for ids in prompts(tokenizer, 2):
        assert plain_onnxruntime_greedy(llama_export.path, ids, 12) == hf_greedy(llama, ids, 12)


def test_onnxruntime_genai_runs_the_export(llama, tokenizer, llama_export):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(llama_export.path))  # reads the export's genai_config.json
    for ids in prompts(tokenizer, 2):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 12, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)][len(ids):]
        assert tokens == hf_greedy(llama, ids, 12)


OPTIMUM_GREEDY = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
import torch
path, prompts, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, use_io_binding=False)
out = []
for ids in prompts:
    found = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                           dtype=torch.long), max_new_tokens=steps, eos_token_id=None,
                           do_sample=False, pad_token_id=0)
    out.append(found[0, len(ids):].tolist())
print(json.dumps(out))
"""


def optimum_python():
    """An interpreter with Optimum's onnxruntime models: this one, or the one named by
    PROMPTBAKE_OPTIMUM_PYTHON (optimum-onnx 0.1 requires transformers < 4.58, so it lives in
    a virtual environment of its own; README, "Serving")."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.onnxruntime"):
        return sys.executable
    return os.environ.get("PROMPTBAKE_OPTIMUM_PYTHON")


def test_the_export_holds_what_generic_consumers_read(llama, tokenizer, llama_export):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(llama_export.path)
    assert config.use_cache and config.num_key_value_heads == llama.config.num_key_value_heads
    written = json.loads((llama_export.path / "config.json").read_text())
    assert written["rope_theta"] == llama.config.rope_parameters["rope_theta"]
    assert json.loads((llama_export.path / "tokenizer_config.json").read_text())[
        "tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 knows this name
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    assert AutoTokenizer.from_pretrained(llama_export.path).apply_chat_template(messages) == \
        tokenizer.apply_chat_template(messages)
    assert (llama_export.path / "generation_config.json").is_file()


def optimum_greedy(path, chosen, steps):
    """Greedy tokens of Optimum's ``ORTModelForCausalLM`` on the export at ``path``, one prompt
    at a time (skips the test where no interpreter has Optimum)."""
    python = optimum_python()
    if python is None:
        pytest.skip("Optimum's onnxruntime models are not installed here (optimum-onnx needs "
                    "transformers < 4.58: set PROMPTBAKE_OPTIMUM_PYTHON to a Python that has it)")
    found = subprocess.run([python, "-c", OPTIMUM_GREEDY, str(path), json.dumps(chosen),
                            str(steps)], capture_output=True, text=True, cwd=path.parent)
    assert found.returncode == 0, found.stderr[-2000:]
    return json.loads(found.stdout.strip().splitlines()[-1])


def test_optimum_runs_the_export(llama, tokenizer, llama_export):
    chosen = prompts(tokenizer, 2)
    assert optimum_greedy(llama_export.path, chosen, 12) == \
        [hf_greedy(llama, ids, 12) for ids in chosen]


def test_optimum_runs_the_int8_export(int8_export, tokenizer):
    chosen = prompts(tokenizer, 2)
    assert optimum_greedy(int8_export.path, chosen, 8) == \
        [plain_onnxruntime_greedy(int8_export.path, ids, 8) for ids in chosen]


def test_optimum_and_a_plain_loop_run_a_bakes_default_int4_export(baked_dir, tokenizer,
                                                                   tmp_path):
    # the LoRA beside the 4-bit base, the 8-bit head, HQQ's zero points folded: standard ops only
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", tolerances=Tolerances(
        int4_top1=0.0, contexts=2, steps=8))
    chosen = prompts(tokenizer, 2)
    plain = [plain_onnxruntime_greedy(found.path, ids, 8) for ids in chosen]
    assert all(len(tokens) == 8 for tokens in plain)
    assert optimum_greedy(found.path, chosen, 8) == plain


def test_a_plain_onnxruntime_loop_runs_the_int8_export(int8_export, tokenizer):
    ids = prompts(tokenizer, 1)[0]
    assert len(plain_onnxruntime_greedy(int8_export.path, ids, 4)) == 4


def test_logits_match_torch_at_every_position(llama, lm):
    ids = list(range(500, 560))
    with torch.no_grad():
        want = llama(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(lm.logits(ids), want, atol=1e-3, rtol=0)


def test_eos_stops_each_sequence(lm, tokenizer):
    chosen = prompts(tokenizer, 2)
    free = lm.generate(chosen, 10, eos_token_ids=())
    stop = free.tokens[0][3]
    assert stop not in free.tokens[0][:3]
    run = lm.generate(chosen, 10, eos_token_ids=[stop])
    assert run.tokens[0] == free.tokens[0][:4]  # ends with the EOS token
    cut = free.tokens[1].index(stop) + 1 if stop in free.tokens[1] else 10
    assert run.tokens[1] == free.tokens[1][:cut]
    alone = lm.generate(chosen[:1], 10, eos_token_ids=[stop])
    assert alone.tokens == [free.tokens[0][:4]] and len(alone.step_seconds) == 3
    # the default stop tokens come from the export's manifest
    assert tokenizer.eos_token_id in lm.manifest["eos_token_ids"]


def test_seeded_sampling_is_reproducible(lm, tokenizer):
    chosen = prompts(tokenizer, 2)
    a = lm.generate(chosen, 12, temperature=1.0, top_p=0.9, seed=3, eos_token_ids=())
    b = lm.generate(chosen, 12, temperature=1.0, top_p=0.9, seed=3, eos_token_ids=())
    c = lm.generate(chosen, 12, temperature=1.0, top_p=0.9, seed=4, eos_token_ids=())
    assert a.tokens == b.tokens and a.tokens != c.tokens
    # a nucleus this small keeps only the most likely token: greedy
    tiny_p = lm.generate(chosen, 12, temperature=1.0, top_p=1e-9, seed=5, eos_token_ids=())
    assert tiny_p.tokens == lm.generate(chosen, 12, eos_token_ids=()).tokens


def test_failed_parity_leaves_no_export(llama, tokenizer, tmp_path, monkeypatch, llama_export):
    # The good graph, with logits that are off by 0.01: a parity failure without tracing again.
    monkeypatch.setattr(graph, "trace", lambda model, path: shutil.copy(
        llama_export.path / "model.onnx", path))
    real = runtime.OnnxLM.logits
    monkeypatch.setattr(runtime.OnnxLM, "logits", lambda self, ids: real(self, ids) + 0.01)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".broken.tmp-{gone.pid}"  # what a killed export leaves: swept away
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    with pytest.raises(ParityError, match="does not match") as caught:
        export_onnx(llama, tokenizer, tmp_path / "broken", tolerances=FAST)
    assert caught.value.report["max_abs_logit_diff"] > 5e-3
    assert not caught.value.report["passed"]
    assert list(tmp_path.iterdir()) == []  # no export, no temporary directory
    # a failed export over an existing one keeps the old one
    before = sorted(p.name for p in llama_export.path.iterdir())
    with pytest.raises(ParityError):
        export_onnx(llama, tokenizer, llama_export.path, tolerances=FAST, overwrite=True)
    assert sorted(p.name for p in llama_export.path.iterdir()) == before
    assert not [p for p in llama_export.path.parent.iterdir() if ".tmp-" in p.name]


def test_unsupported_architecture_is_refused_before_writing(tokenizer, tmp_path):
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedArchitecture, match="gpt_neox.*llama, gpt2"):
        export_onnx(model, tokenizer, tmp_path / "neox")
    assert not (tmp_path / "neox").exists()


def test_bad_inputs_give_clear_errors(tmp_path, tiny_dir, lm, tokenizer, llama):
    with pytest.raises(OnnxLoadError, match="no ONNX model"):
        OnnxLM(tmp_path / "missing")
    (tmp_path / "broken.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(OnnxLoadError, match="cannot load"):
        OnnxLM(tmp_path / "broken.onnx")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        export_model(empty, tmp_path / "out")
    with pytest.raises(ValueError, match="holds no finished bake"):
        export_baked(empty, tmp_path / "out")
    with pytest.raises(ValueError, match="earlier onnx export"):
        export_onnx(llama, tokenizer, lm.path.parent)
    with pytest.raises(ValueError, match="non-empty prompts"):
        lm.generate([[]], 4)
    with pytest.raises(ValueError, match="window of 512"):
        lm.generate([[5] * 500], 20)
    assert not (tmp_path / "out").exists()


# -- int8 and packed pruned weights -------------------------------------------------------------


def pruned_copy(model, fraction=0.5):
    """Zeroes the smallest-magnitude half of every decoder Linear weight (the tied head, which
    is also the embedding, is kept)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                w = module.weight
                cut = w.abs().flatten().kthvalue(int(fraction * w.numel())).values
                w[w.abs() <= cut] = 0
    return model


@pytest.fixture(scope="module")
def pruned(llama):
    return pruned_copy(llama)


@pytest.fixture(scope="module")
def int8_export(pruned, tokenizer, tmp_path_factory):
    return export_onnx(pruned, tokenizer, tmp_path_factory.mktemp("int8") / "dense",
                       quantize="int8", tolerances=LENIENT_INT8)


def test_int8_export_loads_and_runs(int8_export, llama_export, tokenizer):
    manifest = int8_export.manifest
    assert manifest["precision"] == "int8" and manifest["int8"]["tied_head_shared"]
    assert manifest["int8"]["quantized_matmuls"] == 2 * 7 + 1  # 7 per layer and the LM head
    report = manifest["parity"]
    assert report["quantized"] and report["top1_agreement"] >= 0.5
    assert 0 < report["kl_per_token"] < 1 and report["max_abs_logit_diff"] > 0
    # int8 weights: about a quarter of the fp32 export
    assert manifest["bytes"] < 0.3 * llama_export.manifest["bytes"]
    lm = OnnxLM(int8_export.path)
    run = lm.generate(prompts(tokenizer, 2), 8)
    assert all(1 <= len(t) <= 8 for t in run.tokens)
    graph = onnx.load(str(int8_export.path / "model.onnx")).graph
    weights = {i.name: i for i in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert all(i.data_type != onnx.TensorProto.FLOAT or np.prod(i.dims) < 10_000
               or i.name.endswith("_scales")
               for i in weights.values())  # no fp32 matrix left, the tied embedding included


def test_smoothing_keeps_the_function_and_moves_the_ranges(llama, tokenizer):
    calibration = prompts(tokenizer, 3)
    moved = smooth.smoothed(llama, calibration, migration=0.5)
    ids = torch.tensor([calibration[0]])
    with torch.no_grad():
        want, got = llama(input_ids=ids).logits, moved(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)
    before, after = smooth.input_ranges(llama, calibration), smooth.input_ranges(moved, calibration)
    name = "model.layers.0.mlp.down_proj"
    # the input's channels end up closer to each other in range (that is what int8 needs)
    spread = lambda r: float(r.max() / r.clamp(min=1e-6).median())
    assert spread(after[name]) < spread(before[name])
    assert not torch.equal(moved.model.layers[0].mlp.up_proj.weight,
                           llama.model.layers[0].mlp.up_proj.weight)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    assert smooth.smoothed(gpt2, [[1, 2, 3]]) is None  # not implemented there: no smoothing


def test_packed_weights_round_trip_exactly(pruned, tokenizer, int8_export, tmp_path):
    packed = export_onnx(pruned, tokenizer, tmp_path / "sparse", quantize="int8",
                         sparse=True, tolerances=LENIENT_INT8)
    record = packed.manifest["sparse"]
    big = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)
           and m is not pruned.lm_head and m.weight.numel() >= sparse.MIN_ELEMENTS]
    assert record["packed_weights"] == len(big) == 10  # k and v (64 x 32) are too small to pack
    assert record["sparsity"] == pytest.approx(0.5, abs=0.01)
    dense = {i.name: onnx.numpy_helper.to_array(i)
             for i in onnx.load(str(int8_export.path / "model.onnx")).graph.initializer}
    graph = onnx.load(str(packed.path / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    rebuilt = sparse.unpack(graph)
    assert len(rebuilt) == 10
    for name, weight in rebuilt.items():
        assert weight.dtype == dense[name].dtype and np.array_equal(weight, dense[name]), name
    # onnxruntime expands them to the very same weights: identical logits, bit for bit
    ids = list(range(1000, 1050))
    assert np.array_equal(OnnxLM(packed.path).logits(ids), OnnxLM(int8_export.path).logits(ids))
    assert packed.manifest["bytes"] < int8_export.manifest["bytes"]


@pytest.mark.parametrize("shape,density", [((37,), 0.3), ((64, 48), 0.5), ((5, 7, 3), 0.0),
                                           ((16, 16), 1.0)])
def test_packed_form_round_trips(shape, density):
    rng = np.random.default_rng(0)
    for dtype, fill in ((np.int8, 0), (np.float32, 0), (np.uint8, 128)):
        weight = (rng.standard_normal(shape) * 50 + fill).astype(dtype)
        weight[rng.random(shape) >= density] = fill
        packed = sparse.Packed.of(weight, sparse._fill(weight) if density < 0.5 else fill)
        assert packed.values.size == 1 + np.count_nonzero(weight != fill)
        assert np.array_equal(packed.dense(), weight) and packed.dense().dtype == dtype


def test_export_baked_records_the_bake(baked_dir, tmp_path):
    found = export_baked(baked_dir, tmp_path / "baked-onnx", strength=0.5, tolerances=FAST)
    manifest = found.manifest
    assert manifest["parity"]["passed"] and manifest["source"]["strength"] == 0.5
    kl = manifest["held_out_kl"]
    # the fp32 export keeps what the bake achieved (here: a random adapter's effect)
    assert kl["onnx"]["per_token"] == pytest.approx(kl["baked"]["per_token"], rel=1e-3, abs=1e-5)
    merged = export_baked(baked_dir, tmp_path / "merged", format="safetensors", strength=0.5)
    assert (merged.path / "model.safetensors").is_file() and merged.manifest["strength"] == 0.5


# -- --overwrite replaces only an earlier export, never the bake -----------------------------


def test_export_overwrite_refuses_a_directory_with_the_users_files(bake_copy, tmp_path, file_hashes):
    out = tmp_path / "served"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="promptbake did not write; refusing"):
        export_baked(bake_copy, out, format="safetensors", overwrite=True)
    assert file_hashes(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_export_overwrite_replaces_only_an_earlier_export(bake_copy, tmp_path, file_hashes):
    out = tmp_path / "served"
    export_baked(bake_copy, out, format="safetensors", strength=0.5)
    marker = files.read_marker(out)
    assert marker["kind"] == "merged" and "model.safetensors" in marker["files"]
    with pytest.raises(ValueError, match="earlier merged export: pass --overwrite"):
        export_baked(bake_copy, out, format="safetensors")
    done = export_baked(bake_copy, out, format="safetensors", strength=1.0, overwrite=True)
    assert done.manifest["strength"] == 1.0
    # a file of the user's beside an earlier export: the export is not replaced, nothing goes
    (out / "notes.txt").write_text("mine")
    before = file_hashes(out)
    with pytest.raises(ValueError, match=r"did not write \(notes.txt\) beside an earlier export"):
        export_baked(bake_copy, out, format="safetensors", overwrite=True)
    assert file_hashes(out) == before


@pytest.mark.parametrize("where", ["the bake", "its parent", "inside it"])
@pytest.mark.parametrize("format", ["safetensors", "onnx"])
def test_export_never_replaces_the_bake_it_comes_from(bake_copy, where, format, file_hashes):
    out = {"the bake": bake_copy, "its parent": bake_copy.parent,
           "inside it": bake_copy / "served"}[where]
    before = file_hashes(bake_copy.parent)
    with pytest.raises(ValueError, match="the directory it is made from"):
        export_baked(bake_copy, out, format=format, overwrite=True)
    assert file_hashes(bake_copy.parent) == before


def test_export_refuses_to_replace_another_bake(bake_copy, baked_dir, file_hashes):
    before = file_hashes(bake_copy)
    with pytest.raises(ValueError, match="holds a bake; refusing"):
        save_merged(baked_dir, bake_copy, overwrite=True)
    assert file_hashes(bake_copy) == before


def test_export_never_replaces_the_bakes_base_model(bake_copy, tmp_path):
    """A bake whose base model is an earlier export: exporting over that export would destroy
    the weights the bake needs."""
    base = tmp_path / "base-model"
    export_baked(bake_copy, base, format="safetensors")
    manifest = json.loads((bake_copy / "manifest.json").read_text())
    manifest["base_model"]["path"] = str(base)
    (bake_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the directory it is made from"):
        export_baked(bake_copy, base, format="safetensors", overwrite=True)
