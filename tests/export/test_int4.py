"""int4 ONNX export: the 4-bit embedding lookup of a tied head dequantises exactly what
MatMulNBits multiplies with, tiny-model exports (rtn and hqq) pass their parity check and run in
plain onnxruntime, the CLI writes one, and bad options are refused before any work."""

import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForCausalLM

from promptbake import cli, load_baked
from promptbake.artifact import merged_model
from promptbake.export.exporter import model_bytes
from promptbake.export import (
    Int4Options,
    OnnxLM,
    ParityError,
    Tolerances,
    beside,
    check_quantize,
    correction,
    export_baked,
    export_onnx,
    graph,
    merging,
    parity,
    quantize,
)

# A randomly initialised model's next token is a near-tie almost everywhere, so 4-bit weights
# change most choices (top-1 agreement 0.1-0.2 here; 0.8-0.9 on SmolLM2-135M, see quantize.py):
# no floor on the tiny model; the weights themselves are checked exactly below.
TINY_INT4 = Tolerances(int4_top1=0.0, contexts=2, steps=8)


def tied_graph(path, hidden, vocab, seed=0):
    """The two uses of a tied head as graph.py traces them: logits = x @ W ([hidden, vocab]) and
    the embedding lookup Gather(W, ids, axis=1) -> Transpose(1, 2, 0)."""
    weight = np.random.default_rng(seed).standard_normal((hidden, vocab)).astype(np.float32)
    weight[:, 3] *= 40  # an outlier column: its blocks get a larger step
    nodes = [helper.make_node("MatMul", ["x", graph.TIED_HEAD], ["logits"], name="/lm_head/MatMul"),
             helper.make_node("Gather", [graph.TIED_HEAD, "input_ids"], ["columns"], axis=1,
                              name="/embed/Gather"),
             helper.make_node("Transpose", ["columns"], ["embeds"], perm=[1, 2, 0],
                              name="/embed/Transpose")]
    model = helper.make_model(
        helper.make_graph(nodes, "tied",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden]),
                           helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                         ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                         ["n", vocab]),
                           helper.make_tensor_value_info("embeds", TensorProto.FLOAT,
                                                         ["b", "s", hidden])],
                          [numpy_helper.from_array(weight, graph.TIED_HEAD)]),
        opset_imports=[helper.make_opsetid("", graph.OPSET)])
    onnx.save(model, str(path))
    return weight


def tied_feeds(hidden, count=8, seed=2):
    """Calibration feeds of ``tied_graph``: inputs x [n, hidden] with most of their energy in a
    few directions, as a model's hidden states have."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((4, hidden)) * 3 + 0.1 * rng.standard_normal((hidden, hidden))[:4]
    return [{"x": (rng.standard_normal((16, 4)) @ mix
                   + 0.1 * rng.standard_normal((16, hidden))).astype(np.float32),
             "input_ids": np.zeros((1, 1), np.int64)} for _ in range(count)]


def int4_of_tied(tmp_path, monkeypatch, hidden, options):
    """``quantize.int4`` of ``tied_graph``; GPTQ calibrated on ``tied_feeds`` (the graph has
    no token inputs for ``quantize._feeds`` to build)."""
    monkeypatch.setattr(quantize, "_feeds", lambda model, prompts: tied_feeds(hidden))
    return quantize.int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", options,
                         calibration=[[0]] if options.method == "gptq" else None)


@pytest.mark.parametrize("method", ["rtn", "hqq", "hqq-int", "gptq"])
@pytest.mark.parametrize("hidden,block", [(64, 32), (48, 32), (64, 16), (96, 32)])
def test_4bit_lookup_is_the_heads_dequantised_matrix(tmp_path, monkeypatch, method, hidden,
                                                      block):
    vocab = 40
    weight = tied_graph(tmp_path / "fp32.onnx", hidden, vocab)
    # accuracy level 0: MatMulNBits multiplies in fp32, so one-hot rows read its matrix exactly
    options = Int4Options(method=method, block_size=block, accuracy_level=0, head_bits=4)
    if method == "gptq" and -(-hidden // block) % 2:
        with pytest.raises(ValueError, match=r"even number of blocks per column: /lm_head/MatMul "
                                             r"has 96 input rows, 3 blocks of 32; use another "
                                             r"method or --block-size 16"):
            int4_of_tied(tmp_path, monkeypatch, hidden, options)
        assert not (tmp_path / "int4.onnx").exists()
        return
    record = int4_of_tied(tmp_path, monkeypatch, hidden, options)
    assert record["tied_head_shared"] and record["quantized_matmuls"] == 1
    # float zero points go to a term of their own, but where K is padded to whole blocks
    assert record["zero_points_folded"] == int(method == "hqq" and hidden % block == 0)
    model = onnx.load(str(tmp_path / "int4.onnx"))
    onnx.checker.check_model(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert graph.TIED_HEAD not in inits  # the fp32 matrix is gone: stored once, at 4 bits
    codes = inits[graph.TIED_HEAD + "_Q4"]
    assert codes.dtype == np.uint8 and codes.shape == (vocab, -(-hidden // block), block // 2)
    zeros = inits.get(graph.TIED_HEAD + "_zero_points")
    assert (zeros is not None) == (method != "rtn")
    if method in ("hqq-int", "gptq"):  # whole zero points, 4 bits each, two per byte
        assert zeros.dtype == np.uint8 and zeros.shape == (vocab, -(-hidden // block // 2))
        zeros = zeros.reshape(-1)
    want = quantize.dequantize_4bit(codes, inits[graph.TIED_HEAD + "_scales"], zeros)[:hidden]
    assert np.abs(want - weight).max() < np.abs(weight).max() / 7  # it is a 4-bit copy of it

    session = ort.InferenceSession(str(tmp_path / "int4.onnx"))
    ids = np.array([[0, 3, 39, 3], [7, 1, 2, 20]], dtype=np.int64)
    logits, embeds = session.run(["logits", "embeds"],
                                 {"x": np.eye(hidden, dtype=np.float32), "input_ids": ids})
    if method == "hqq":  # float zero points: folded into a term of their own (fold_zero_points)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    else:
        assert np.array_equal(logits, want)  # numpy reads the codes as MatMulNBits does
    assert np.array_equal(embeds, want.T[ids])  # and the lookup dequantises the same numbers


@pytest.mark.parametrize("block", [16, 32])
def test_integer_zero_points_fit_the_weights_as_well_as_hqqs_float_ones(tmp_path, block):
    # the rounded zero costs little once the codes and scale are refitted to it
    weight = tied_graph(tmp_path / "fp32.onnx", 64, 40, seed=1)
    errors = {}
    for method in ("hqq", "hqq-int", "rtn"):
        quantize.int4(tmp_path / "fp32.onnx", tmp_path / f"{method}.onnx",
                      Int4Options(method=method, block_size=block, accuracy_level=0,
                                  head_bits=4))
        inits = {i.name: numpy_helper.to_array(i)
                 for i in onnx.load(str(tmp_path / f"{method}.onnx")).graph.initializer}
        zeros = inits.get(graph.TIED_HEAD + "_zero_points")
        got = quantize.dequantize_4bit(inits[graph.TIED_HEAD + "_Q4"],
                                       inits[graph.TIED_HEAD + "_scales"],
                                       None if zeros is None else zeros.reshape(-1))
        errors[method] = float(np.square(got - weight).mean())
    assert errors["hqq-int"] < 1.15 * errors["hqq"] and errors["hqq-int"] < errors["rtn"]


def test_onnxruntimes_gptq_spreads_no_error_so_its_calibration_changes_nothing(tmp_path,
                                                                              monkeypatch):
    # onnxruntime 1.32's GPTQ port spreads a row's rounding error with the column of its upper
    # triangular inverse-Hessian factor below the diagonal, which is zero: nothing is spread,
    # and the codes are asymmetric min-max rounding whatever the calibration. Documented in
    # quantize.py and the README; this fails when onnxruntime fixes it, to be measured again.
    hidden = 64
    tied_graph(tmp_path / "fp32.onnx", hidden, 40, seed=3)
    codes = []
    for seed in (2, 9):
        monkeypatch.setattr(quantize, "_feeds", lambda model, prompts, seed=seed:
                            tied_feeds(hidden, seed=seed) if seed == 2 else
                            [{**f, "x": f["x"] * np.linspace(0.1, 10, hidden, dtype=np.float32)}
                             for f in tied_feeds(hidden, seed=seed)])
        quantize.int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx",
                      Int4Options(method="gptq", block_size=32, accuracy_level=0),
                      calibration=[[0]])
        inits = {i.name: numpy_helper.to_array(i)
                 for i in onnx.load(str(tmp_path / "int4.onnx")).graph.initializer}
        codes.append(inits[graph.TIED_HEAD + "_Q4"])
    np.testing.assert_array_equal(codes[0], codes[1])


def test_unpacked_integer_zero_points_round_trip():
    zeros = np.array([[3, 15, 0], [7, 1, 9]], np.float32)  # 3 blocks: the last byte half used
    blocks = quantize.Blocks4(np.zeros((2, 3, 16), np.uint8), np.ones((2, 3), np.float32), zeros,
                              48, "s", "z", integer_zeros=True)
    assert np.array_equal(blocks.weight(), -np.repeat(zeros, 16, axis=1))
    packed = np.array([0xF3, 0x00, 0x17, 0x09], np.uint8)
    assert np.array_equal(quantize.unpack_zeros(packed, 2, 3), zeros)


@pytest.mark.parametrize("level", [0, 4])
def test_folded_zero_points_leave_the_product_and_the_stored_grid_as_they_were(tmp_path, level):
    # HQQ's float zero points put MatMulNBits on onnxruntime's slow path; fold_zero_points
    # moves them to x's block sums times (8 - z) s, beside the node run without them
    weight = tied_graph(tmp_path / "fp32.onnx", 64, 40, seed=4)
    options = Int4Options(method="hqq", block_size=16, accuracy_level=level, head_bits=4)
    assert quantize.int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx",
                         options)["zero_points_folded"] == 1
    model = onnx.load(str(tmp_path / "int4.onnx"))
    onnx.checker.check_model(model)
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(node.input) == 3  # no zero points on the node: its default, 8
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zeros = inits[graph.TIED_HEAD + "_zero_points"]  # kept under its name, read by the lookup
    assert zeros.dtype == np.float32 and zeros.shape == (40, 4)
    blocks = quantize.blocks_4bit(model)["lm_head"]
    assert blocks.zeros_name == graph.TIED_HEAD + "_zero_points"
    np.testing.assert_array_equal(blocks.zeros, zeros)
    want = quantize.dequantize_4bit(inits[graph.TIED_HEAD + "_Q4"],
                                    inits[graph.TIED_HEAD + "_scales"], zeros.reshape(-1))
    assert np.abs(want - weight).max() < np.abs(weight).max() / 7
    x = np.random.default_rng(5).standard_normal((6, 64)).astype(np.float32)
    x[:, 7] *= 30  # an outlier input channel
    logits = ort.InferenceSession(str(tmp_path / "int4.onnx")).run(
        ["logits"], {"x": x, "input_ids": np.zeros((1, 1), np.int64)})[0]
    if level == 0:  # fp32 compute: the same product as the dequantised matrix's
        # (summed in another order: within fp32 rounding of the largest output)
        np.testing.assert_allclose(logits, x @ want, atol=1e-5 * np.abs(x @ want).max())
    else:  # int8 activations, per block of 16: within their rounding
        assert np.abs(logits - x @ want).max() < 0.02 * np.abs(x @ want).max()
    # learned scales and zero points written back move the folded term with them
    quantize.set_scales_4bit(model, "lm_head", blocks, blocks.scales * 1.5, blocks.zeros + 0.25)
    moved = quantize.blocks_4bit(model)["lm_head"]
    np.testing.assert_array_equal(moved.zeros, blocks.zeros + 0.25)
    onnx.save(model, str(tmp_path / "moved.onnx"))
    logits = ort.InferenceSession(str(tmp_path / "moved.onnx")).run(
        ["logits"], {"x": x, "input_ids": np.zeros((1, 1), np.int64)})[0]
    if level == 0:
        np.testing.assert_allclose(logits, x @ moved.weight().T,
                                   atol=1e-5 * np.abs(logits).max())


def test_an_8bit_head_is_stored_once_and_read_back_as_the_graph_computes(tmp_path):
    hidden, vocab = 64, 40
    weight = tied_graph(tmp_path / "fp32.onnx", hidden, vocab, seed=6)
    record = quantize.int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx",
                           Int4Options(method="hqq", accuracy_level=0))  # head_bits: 8
    assert record["head_bits"] == 8 and record["tied_head_shared"]
    assert record["weight_bytes"]["codes"] == vocab * hidden  # a byte per weight
    model = onnx.load(str(tmp_path / "int4.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert graph.TIED_HEAD not in inits and graph.TIED_HEAD + "_Q4" not in inits
    assert quantize.blocks_4bit(model) == {}
    head = quantize.weights_8bit(model)["lm_head"]  # [vocab, hidden]
    assert head.shape == (vocab, hidden)
    assert np.abs(head - weight.T).max() < np.abs(weight).max() / 100  # an 8-bit copy
    ids = np.array([[0, 3, 39]], dtype=np.int64)
    logits, embeds = ort.InferenceSession(str(tmp_path / "int4.onnx")).run(
        ["logits", "embeds"], {"x": np.eye(hidden, dtype=np.float32), "input_ids": ids})
    np.testing.assert_allclose(logits, head.T, rtol=1e-6, atol=1e-6)  # level 0: fp32 compute
    assert np.array_equal(embeds, head[ids])  # the lookup reads the same 8-bit rows


def test_nibble_order_is_low_first():
    codes = np.array([[[0x21, 0xF0]]], dtype=np.uint8)  # elements 1, 2, 0, 15
    weight = quantize.dequantize_4bit(codes, np.array([2.0], np.float32))
    assert weight[:, 0].tolist() == [-14.0, -12.0, -16.0, 14.0]


@pytest.fixture(scope="module")
def llama(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["rtn", "hqq", "hqq-int", "gptq"])
def int4_export(request, llama, tokenizer, tmp_path_factory):
    return export_onnx(llama, tokenizer, tmp_path_factory.mktemp("int4") / request.param,
                       quantize="int4", int4=Int4Options(method=request.param, block_size=32),
                       tolerances=TINY_INT4)


def plain_logits(path, ids):
    """[positions, vocab] logits of the export at ``path`` from a plain onnxruntime session fed
    the usual causal-LM inputs and an empty KV cache, as a generic consumer runs it."""
    session = ort.InferenceSession(str(path / "model.onnx"))
    feeds = {"input_ids": np.array([ids], np.int64),
             "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past})
    return session.run(["logits"], feeds)[0][0]


def test_int4_export_passes_parity_and_runs_in_plain_onnxruntime(int4_export, tokenizer):
    manifest = int4_export.manifest
    record, method = manifest["int4"], manifest["int4"]["method"]
    assert manifest["precision"] == "int4" and record["block_size"] == 32
    assert record["tied_head_shared"] and record["quantized_matmuls"] == 2 * 7 + 1
    report = manifest["parity"]
    assert report["passed"] and report["quantized"]
    assert report["criterion"] == "top-1 agreement with torch fp32 >= 0.0"
    assert 0 < report["kl_per_token"] < 2 and report["max_abs_logit_diff"] > 0
    assert json.loads((int4_export.path / "manifest.json").read_text()) == manifest
    # 4 bits and a 32-bit scale per 32 weights (rtn), and a 32-bit (hqq) or 4-bit (hqq-int,
    # gptq) zero point
    kept = {"rtn": 5 / 32, "hqq": 6 / 32, "hqq-int": (5 + 1 / 8) / 32,
            "gptq": (5 + 1 / 8) / 32}[method]
    # the head (most of the tiny model) in 8 bits and a 32-bit scale per 32, but with gptq
    assert record["head_bits"] == (4 if method == "gptq" else 8)
    kept = max(kept, 9 / 32) if record["head_bits"] == 8 else kept
    assert manifest["bytes"] < (kept + 0.01) * record["fp32_bytes"]
    assert record["weight_bytes"]["zero_points"] > 0 if method != "rtn" else \
        record["weight_bytes"]["zero_points"] == 0
    model = onnx.load(str(int4_export.path / "model.onnx"))
    assert all(i.data_type != TensorProto.FLOAT or np.prod(i.dims) < 10_000
               or i.name.endswith(("_scales", "_zero_points"))
               for i in model.graph.initializer)  # no fp32 matrix, the embedding included
    ids = parity.default_prompts(tokenizer, count=1)[0]
    logits = plain_logits(int4_export.path, ids)[None]
    assert logits.shape == (1, len(ids), len(tokenizer)) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, OnnxLM(int4_export.path).logits(ids)[None], atol=1e-5)


def test_gpt2_exports_in_int4(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=4,
                                       n_positions=512, initializer_range=0.2)).eval()
    found = export_onnx(model, tokenizer, tmp_path / "gpt2", quantize="int4",
                        int4=Int4Options(method="hqq", block_size=32), tolerances=TINY_INT4)
    # Conv1D layers trace to Gemm, rewritten as MatMul to be quantised: 4 per layer and the head
    assert found.manifest["int4"]["quantized_matmuls"] == 4 + 1
    assert found.manifest["int4"]["tied_head_shared"] and found.manifest["parity"]["passed"]


def test_an_untied_head_goes_to_8_bits_alone(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.2)).eval()
    found = export_onnx(model, tokenizer, tmp_path / "untied", quantize="int4",
                        int4=Int4Options(accuracy_level=0), tolerances=TINY_INT4)
    record = found.manifest["int4"]
    assert record["head_bits"] == 8 and not record["tied_head_shared"]
    assert record["quantized_matmuls"] == 7 + 1 and record["zero_points_folded"] == 7
    onnx_model = onnx.load(str(found.path / "model.onnx"))
    head = quantize.weights_8bit(onnx_model)["lm_head"]
    want = model.lm_head.weight.detach().numpy()
    assert np.abs(head - want).max() < np.abs(want).max() / 100  # an 8-bit copy of it
    # torch with the graph's weights (the input embedding, its own matrix, stays fp32) computes
    # what the graph does at accuracy level 0
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in {**quantize.weights_4bit(onnx_model), "lm_head": head}.items():
            modules[name].weight.copy_(torch.from_numpy(weight))
        ids = parity.default_prompts(tokenizer, count=1)[0]
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(plain_logits(found.path, ids), want, atol=2e-4, rtol=1e-4)


def test_a_failed_int4_parity_check_writes_nothing(llama, tokenizer, tmp_path):
    with pytest.raises(ParityError, match=r">= 1.01"):
        export_onnx(llama, tokenizer, tmp_path / "out", quantize="int4",
                    int4=Int4Options(method="rtn"),
                    tolerances=Tolerances(int4_top1=1.01, contexts=1, steps=4))
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_bake_as_int4(baked_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(parity, "Tolerances", functools.partial(
        parity.Tolerances, int4_top1=0.0, contexts=2, steps=8))
    out = tmp_path / "int4"
    assert cli.main(["export", str(baked_dir), "--out", str(out), "--quantize", "int4",
                     "--int4-method", "rtn", "--block-size", "32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "int4" in printed and "smaller than fp32" in printed and "keeps" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["int4"]["method"] == "rtn" and manifest["int4"]["block_size"] == 32
    kl = manifest["held_out_kl"]  # the bake's retention, as int8 records it
    assert {"onnx", "baked", "base", "retention"} <= kl.keys()


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4", "--block-size", "48"], "block_size=48 must be a power of 2"),
    (["--quantize", "int8", "--block-size", "8"], "block_size=8 must be a power of 2"),
    (["--int4-method", "hqq"], "--int4-method applies to --quantize int4"),
    (["--format", "gguf", "--quantize", "q4_0", "--block-size", "64"],
     "--block-size applies to --quantize int8 or int4"),
    (["--format", "gguf", "--quantize", "int4"],
     "int4 is the ONNX export's: use --format onnx (4 bits in the GGUF export: --quantize q4_1, "
     "which keeps the bake beside the base)"),
    (["--format", "onnx", "--quantize", "q4_0"], "--quantize int4"),
    (["--int4-lora", "beside"], "--int4-lora applies to --quantize int4"),
    (["--quantize", "int4", "--int4-lora", "merge", "--recover-steps", "5"], (
        "--recover-steps, --recover-lr and --recover-contexts apply to --prune, or to --quantize "
        "int4 with the LoRA beside (its default)")),
    (["--quantize", "int8", "--recover-contexts", "96"], "--recover-contexts apply to --prune"),
    (["--quantize", "int4", "--int4-lora", "beside", "--recover-steps", "2",
      "--recover-contexts", "0"], "--recover-contexts 0: give at least 1"),
    (["--quantize", "int4", "--int4-lora", "beside", "--recover-contexts", "8"],
     "which runs with --recover-steps N (N > 0)"),
    (["--prune", "0.5", "--recover-contexts", "0"], "--recover-contexts 0: give at least 1"),
    (["--quantize", "int4", "--int4-lora", "beside", "--prune", "0.5"], "choose one"),
    (["--quantize", "int4", "--int4-lora", "beside", "--recover-steps", "-1"],
     "recover_steps=-1 must be a whole number >= 0"),
    (["--quantize", "int4", "--int4-lora", "merge", "--int4-correction", "4"],
     ("--int4-correction puts a correction beside the 4-bit base: add --quantize int4, "
      "without --int4-lora merge")),
    (["--quantize", "int8", "--int4-head", "8"], "--int4-head applies to --quantize int4"),
    (["--int4-compute", "fp32"], "--int4-compute applies to --quantize int4"),
    (["--quantize", "int4", "--int4-lora", "beside", "--int4-correction", "-2"],
     "correction_rank=-2 must be a whole number >= 0"),
])
def test_cli_refuses_bad_int4_options(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "no-bake"), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_a_runtime_without_the_operator_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                   quantization):
    class NoMatMulNBits:  # what an onnxruntime without the contrib operator says
        def __init__(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
                               "implementation for MatMulNBits(1) node with name ''")

    quantize.require_matmul_nbits.cache_clear()
    monkeypatch.setattr(ort, "InferenceSession", NoMatMulNBits)
    out = tmp_path / "out"
    try:
        assert cli.main(["export", str(tmp_path / "no-bake"), "--out", str(out),
                         "--quantize", quantization]) == 2
    finally:
        quantize.require_matmul_nbits.cache_clear()
    err = capsys.readouterr().err
    bits = quantization[3:]
    assert f"cannot run the {bits}-bit MatMulNBits operator the {quantization} export" in err
    assert "Could not find an implementation" in err and "pip install -U onnxruntime" in err
    assert not out.exists()


def test_cli_names_the_int4_methods(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", str(tmp_path), "--out", str(tmp_path / "out"), "--quantize", "int4",
                  "--int4-method", "awq"])
    assert "invalid choice: 'awq' (choose from 'hqq', 'hqq-int', 'rtn', 'gptq')" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "int4" in text and "--int4-method" in text and "--block-size" in text


def test_bad_options_are_refused_before_any_work(llama, tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="int4 method 'awq': choose hqq, hqq-int, rtn, gptq"):
        export_onnx(llama, tokenizer, tmp_path / "out", quantize="int4",
                    int4=Int4Options(method="awq"))
    with pytest.raises(ValueError, match="'gptq' quantises every MatMul: exclude, head_bits=8 "
                                         "and keep_head_fp32 apply to hqq, hqq-int and rtn"):
        export_onnx(llama, tokenizer, tmp_path / "out", quantize="int4",
                    int4=Int4Options(method="gptq", keep_head_fp32=True))
    with monkeypatch.context() as patch:  # refused before the trace
        patch.setattr(graph, "trace", lambda *a, **k: pytest.fail("traced"))
        with pytest.raises(ValueError, match=r"needs an even number of blocks per column: "
                                             r"model.layers.0.self_attn.q_proj has 64 input rows, "
                                             r"1 blocks of 64; use another method or "
                                             r"--block-size 32"):
            export_onnx(llama, tokenizer, tmp_path / "out", quantize="int4",
                        int4=Int4Options(method="gptq", block_size=64), tolerances=TINY_INT4)
    with pytest.raises(ValueError, match="'gptq' calibrates on prompts: pass calibration"):
        quantize.int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options(method="gptq"))
    with pytest.raises(ValueError, match="block_size=100 must be a power of 2"):
        export_onnx(llama, tokenizer, tmp_path / "out", quantize="int4",
                    int4=Int4Options(block_size=100))
    with pytest.raises(ValueError, match="use --format onnx"):
        check_quantize("gguf", "int4")
    with pytest.raises(ValueError, match="export the bake with export_baked"):
        export_onnx(llama, tokenizer, tmp_path / "out", quantize="int4",
                    int4=Int4Options(lora="beside"))
    with pytest.raises(ValueError, match="set lora='beside'"):
        Int4Options(lora="merge", recover_steps=3).validate()
    with pytest.raises(ValueError, match="head_bits=6: choose 4 or 8"):
        Int4Options(head_bits=6).validate()
    with pytest.raises(ValueError, match="head_bits=8 and keep_head_fp32 both choose"):
        Int4Options(head_bits=8, keep_head_fp32=True).validate()
    with pytest.raises(ValueError, match="exclude, head_bits=8 and keep_head_fp32 apply to hqq"):
        Int4Options(method="gptq", head_bits=8).validate()
    with pytest.raises(ValueError, match="choose 'merge'"):
        Int4Options(lora="sideways").validate()
    with pytest.raises(ValueError, match="recover_contexts=0 must be a whole number >= 1"):
        Int4Options(lora="beside", recover_steps=2, recover_contexts=0).validate()
    with pytest.raises(ValueError, match="correction_rank puts a correction beside the 4-bit "
                                         "base, trained with the LoRA kept there: set "
                                         "lora='beside'"):
        Int4Options(lora="merge", correction_rank=4).validate()
    assert list(tmp_path.iterdir()) == []


def test_gptq_refuses_what_onnxruntimes_gptq_cannot_quantise():
    rows = {"q": 576, "down": 1536}
    assert quantize.gptq_problem(rows, 32, 10**9) is None  # 18 and 48 blocks
    odd = quantize.gptq_problem(rows, 64, 10**9)  # 9 blocks of 64 in 576 rows
    assert odd.endswith("q has 576 input rows, 9 blocks of 64; use another method or "
                        "--block-size 32")  # the nearest size below that fits
    assert quantize.gptq_problem({"x": 96}, 128, 10**9).endswith("--block-size 64")
    assert "no block size of 16-128 fits" in quantize.gptq_problem({"x": 16}, 16, 10**9)
    big = quantize.gptq_problem(rows, 32, 7 * 2**30)  # SmolLM2-1.7B's fp32 weights
    assert "under 2 GiB of fp32 weights" in big and "7.0 GiB" in big and "hqq" in big
    with pytest.raises(ValueError, match="exclude, head_bits=8 and keep_head_fp32 apply to hqq"):
        Int4Options(method="gptq", exclude=("down_proj",)).validate()


# -- the LoRA kept beside a 4-bit base ----------------------------------------------------------


@pytest.mark.parametrize("method, head", [("rtn", 4), ("hqq", 4), ("hqq-int", 4), ("gptq", 4),
                                          ("hqq", 8)])
def test_lora_beside_is_the_4bit_base_plus_the_exact_lora(baked_dir, tokenizer, tmp_path, method,
                                                          head):
    # accuracy level 0: fp32 compute, so the graph must equal torch on the same weights; fp32
    # storage, so the factors are the bake's own (fp16 storage: test_fp16_storage)
    options = Int4Options(method=method, lora="beside", accuracy_level=0, head_bits=head,
                          scale_storage="fp32")
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", int4=options,
                         tolerances=TINY_INT4)
    record = found.manifest["int4"]["beside"]
    # r=4 on q, k, v, o of 2 layers: (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) inputs and
    # outputs per layer
    assert record["branches"] == 8 and record["parameters"] == 2 * 4 * (128 + 96 + 96 + 128)
    model = onnx.load(str(found.path / "model.onnx"))
    # each branch, and each folded zero-point term, computed with the others of its input
    # (branches.fuse): none is added on its own
    assert not [n for n in model.graph.node if n.name.endswith(("lora/add", "zero_term/add"))]
    folded = [n for n in model.graph.node if n.name.endswith("_zero_term/centred")]
    assert found.manifest["int4"]["fused_side_terms"] == 8 + len(folded)
    weights = quantize.weights_4bit(model)
    assert ("lm_head" in weights) == (head == 4)
    weights.update(quantize.weights_8bit(model))  # an 8-bit head: read back as the graph has it
    assert {"lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"} \
        <= weights.keys()
    baked = load_baked(baked_dir)
    base = dict(baked.model.named_parameters())
    # the graph's base weights are a 4-bit copy of the base model's, not of the merged ones
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        fp32 = base[f"base_model.model.{name}.base_layer.weight"
                    if "self_attn" in name else f"base_model.model.{name}.weight"]
        step = fp32.detach().abs().max().item() / 7
        assert np.abs(weights[name] - fp32.detach().numpy()).max() < step
    student = beside.on_quantized_base(baked.model, weights, 1.0)
    ids = parity.default_prompts(tokenizer, count=1)[0]
    with torch.no_grad():
        want = student(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(plain_logits(found.path, ids), want, atol=2e-4, rtol=1e-4)
    # the LoRA factors stored are the bake's own, unchanged
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name.endswith(("lora_A", "lora_B"))}
    for name, (a, b) in merging.lora_factors(baked.model, 1.0).items():
        np.testing.assert_array_equal(stored[f"{name}.lora_A"], a)
        np.testing.assert_array_equal(stored[f"{name}.lora_B"], b)


def test_fp16_storage_halves_the_numbers_beside_the_codes_and_computes_as_fp32(
        baked_dir, tokenizer, tmp_path):
    # the default: scales, HQQ's zero points and the LoRA factors stored in fp16, cast back
    options = dict(method="hqq", lora="beside", accuracy_level=0, head_bits=4)
    half = export_baked(baked_dir, tmp_path / "fp16", quantize="int4", tolerances=TINY_INT4,
                        int4=Int4Options(**options))
    full = export_baked(baked_dir, tmp_path / "fp32", quantize="int4", tolerances=TINY_INT4,
                        int4=Int4Options(**options, scale_storage="fp32"))
    record = half.manifest["int4"]["fp16_storage"]
    assert "fp16_storage" not in full.manifest["int4"]
    model, exact = (onnx.load(str(e.path / "model.onnx")) for e in (half, full))
    stored = {i.name: i for i in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    # every 4-bit node's scales and folded zero points, and every LoRA factor, read via a Cast
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    zeros = [n.input[1] for n in model.graph.node if n.name.endswith("_zero_term/centred")]
    lora = [n.removesuffix(quantize.HALF) for n in stored if ".lora_" in n]
    beside_names = [n.input[2] for n in nbits] + zeros + lora
    assert len(nbits) == 15 and len(zeros) == 15 and len(lora) == 16
    for name in beside_names:
        assert stored[casts[name]].data_type == TensorProto.FLOAT16, name
    assert record["tensors"] == len(beside_names) and record["kept_fp32"] == 0
    # the manifest's bytes by kind are the stored ones: scales and zero points at half
    stored_bytes, exact_bytes = (e.manifest["int4"]["weight_bytes"] for e in (half, full))
    assert stored_bytes["codes"] == exact_bytes["codes"]
    for kind in ("scales", "zero_points"):
        assert 2 * stored_bytes[kind] == exact_bytes[kind] > 0
    # the file is smaller by what fp16 saves, less the Cast nodes' ~100 bytes each
    saved = model_bytes(full.path) - model_bytes(half.path)
    assert 0.95 * record["bytes_saved"] < saved <= record["bytes_saved"]
    # read back: the same grid to fp16's rounding
    for name, blocks in quantize.blocks_4bit(model).items():
        want = quantize.blocks_4bit(exact)[name]
        assert np.array_equal(blocks.codes, want.codes)
        np.testing.assert_allclose(blocks.scales, want.scales, rtol=2 ** -10)
        np.testing.assert_allclose(blocks.zeros, want.zeros, rtol=2 ** -10, atol=2 ** -10)
    # a LoRA pair rebalanced, its product kept
    exact_inits = {i.name: numpy_helper.to_array(i) for i in exact.graph.initializer}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        a, b = (numpy_helper.to_array(stored[f"{name}.lora_{f}{quantize.HALF}"]).astype(np.float32)
                for f in "AB")
        want = exact_inits[f"{name}.lora_A"] @ exact_inits[f"{name}.lora_B"]
        np.testing.assert_allclose(a @ b, want, atol=2e-3 * np.abs(want).max())
        assert np.isclose(np.abs(a).max(), np.abs(b).max(), rtol=2e-3)
    # and a plain onnxruntime session computes nearly what the fp32-stored graph does
    ids = parity.default_prompts(tokenizer, count=1)[0]
    got, want = plain_logits(half.path, ids), plain_logits(full.path, ids)
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    assert half.manifest["parity"]["passed"]


def test_store_half_keeps_what_fp16_cannot_hold_in_fp32():
    # store_half reads the graph's wiring only: a MatMulNBits node's scales (tiny: stay fp32)
    # and zero points, a scale too large for fp16, and a LoRA pair (rebalanced, product kept)
    rng = np.random.default_rng(0)
    inits = {"w_scales": np.array([1e-6, 0.5], np.float32),  # 1e-6: below fp16's normals
             "w_zero_points": np.array([7.3, 8.1], np.float32),
             "v_scales": np.array([1e5, 1.0], np.float32),  # beyond fp16's range
             "m.lora_A": rng.normal(size=(4, 2)).astype(np.float32),
             "m.lora_B": 1e-4 * rng.normal(size=(2, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMulNBits", ["x", "w_Q4", "w_scales", "w_zero_points"], ["y"],
                              domain="com.microsoft"),
             helper.make_node("MatMulNBits", ["x", "v_Q4", "v_scales"], ["z"],
                              domain="com.microsoft")]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [], [], [numpy_helper.from_array(v, k) for k, v in inits.items()]))
    record = quantize.store_half(model)
    assert record == {"tensors": 3, "bytes_saved": 2 * (2 + 8 + 6), "kept_fp32": 2}
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert stored["w_scales"].dtype == stored["v_scales"].dtype == np.float32
    assert stored["w_zero_points" + quantize.HALF].dtype == np.float16
    a, b = (stored[f"m.lora_{f}{quantize.HALF}"].astype(np.float32) for f in "AB")
    want = inits["m.lora_A"] @ inits["m.lora_B"]
    np.testing.assert_allclose(a @ b, want, atol=2e-3 * np.abs(want).max())
    assert np.isclose(np.abs(a).max(), np.abs(b).max(), rtol=2e-3)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert [n.output[0] for n in casts] == ["w_zero_points", "m.lora_A", "m.lora_B"]
    assert model.graph.node[len(casts)].op_type == "MatMulNBits"  # the Casts come first
    np.testing.assert_array_equal(quantize._constant({i.name: i for i in model.graph.initializer},
                                                    "w_zero_points"),
                                  inits["w_zero_points"].astype(np.float16).astype(np.float32))


def test_scale_storage_is_checked_before_any_work(baked_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert cli.main(["export", str(baked_dir), "--out", str(out), "--scale-storage",
                     "fp32"]) == 2
    assert "--scale-storage applies to --quantize int8 or int4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scale_storage='bf16': choose fp16"):
        Int4Options(scale_storage="bf16").validate()
    assert not out.exists()


def test_lora_beside_recovers_on_the_4bit_base_and_leaves_the_bake(baked_dir, tmp_path, capsys,
                                                                  monkeypatch, file_hashes):
    monkeypatch.setattr(parity, "Tolerances", functools.partial(
        parity.Tolerances, int4_top1=0.0, contexts=2, steps=8))
    before = file_hashes(baked_dir)
    out = tmp_path / "int4"
    assert cli.main(["export", str(baked_dir), "--out", str(out), "--quantize", "int4",
                     "--int4-lora", "beside", "--int4-head", "4", "--recover-steps", "3",
                     "--recover-contexts", "3", "--scale-storage", "fp32", "--quiet"]) == 0
    assert "keeps" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["int4"]
    assert record["lora"] == "beside" and record["recover_steps"] == 3
    recovery = record["beside"]["recovery"]
    assert [s for s, _ in recovery["train_kl_per_token"]] == [1, 2, 3]
    assert record["recover_contexts"] == 3 and recovery["trajectories"]["count"] == 3 * 2
    model = onnx.load(str(out / "model.onnx"))
    blocks = quantize.blocks_4bit(model)
    # the LoRA and each block's scale and (HQQ's) zero point were trained, the head's included
    assert recovery["trainable_parameters"] == record["beside"]["parameters"] + sum(
        2 * b.scales.size for b in blocks.values())
    # and written to the graph if they lowered the held-out KL (else the start stays)
    assert recovery["kept"] == (recovery["kl_after"]["per_token"]
                                < recovery["kl_before"]["per_token"])
    assert record["beside"]["scales_learned"] == (len(blocks) if recovery["kept"] else 0)
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    start = merging.lora_factors(load_baked(baked_dir).model, 1.0)
    assert any(not np.array_equal(stored[f"{name}.lora_B"], b)
               for name, (_, b) in start.items()) == recovery["kept"]
    assert file_hashes(baked_dir) == before


@pytest.mark.parametrize("better", [True, False])
def test_a_recovery_that_raises_the_held_out_kl_is_dropped(baked_dir, tmp_path, monkeypatch,
                                                           better):
    def recover(student, teacher, tokenizer, **kwargs):  # moves what recovery trains
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_" in name or name.endswith(("scale_change", "zero_change")):
                    p.add_(0.5)
        return {"kl_before": {"per_token": 0.2}, "kl_after": {"per_token": 0.1 if better else 0.3}}

    monkeypatch.setattr(beside.compress, "recover", recover)
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", tolerances=TINY_INT4,
                         int4=Int4Options(recover_steps=1, head_bits=4, scale_storage="fp32"))
    record = found.manifest["int4"]["beside"]
    assert record["recovery"]["kept"] == better
    model = onnx.load(str(found.path / "model.onnx"))
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    start = merging.lora_factors(load_baked(baked_dir).model, 1.0)
    for name, (a, b) in start.items():
        assert np.array_equal(stored[f"{name}.lora_B"], b) != better
    fresh = export_baked(baked_dir, tmp_path / "none", quantize="int4", tolerances=TINY_INT4,
                         int4=Int4Options(head_bits=4, scale_storage="fp32"))
    untrained = quantize.blocks_4bit(onnx.load(str(fresh.path / "model.onnx")))
    for name, blocks in quantize.blocks_4bit(model).items():
        assert np.array_equal(blocks.scales, untrained[name].scales) != better


def test_int4_keeps_the_lora_beside_a_4bit_base_and_the_head_in_8_bits_by_default(baked_dir,
                                                                                  tmp_path):
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", tolerances=TINY_INT4)
    record = found.manifest["int4"]
    assert record["lora"] == "beside" and record["head_bits"] == 8 and record["method"] == "hqq"
    assert record["beside"]["branches"] == 8 and record["zero_points_folded"] == 2 * 7
    model = onnx.load(str(found.path / "model.onnx"))
    assert set(quantize.weights_8bit(model)) == {"lm_head"}
    # every 4-bit node on onnxruntime's fast path: no float zero points on a node
    assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "MatMulNBits")
    # pruning works on the merged weights: a pruned bake's int4 merges
    with pytest.raises(ValueError, match=r"lora='beside'\) applies to quantize='int4' "
                                         r"without pruning"):
        export_baked(baked_dir, tmp_path / "pruned", quantize="int4", prune=lambda m: None,
                     int4=Int4Options(lora="beside"))


@pytest.mark.parametrize("method", ["hqq", "hqq-int", "gptq"])
def test_learned_scales_move_the_graphs_grid_and_torch_follows(baked_dir, tokenizer, tmp_path,
                                                               method):
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", tolerances=TINY_INT4,
                         int4=Int4Options(method=method, lora="beside", accuracy_level=0,
                                          head_bits=4, scale_storage="fp32"))
    model = onnx.load(str(found.path / "model.onnx"))
    blocks = quantize.blocks_4bit(model)
    baked = load_baked(baked_dir)
    student = beside.on_quantized_base(baked.model, {n: b.weight() for n, b in blocks.items()},
                                       1.0)
    ids = torch.tensor([parity.default_prompts(tokenizer, count=1)[0]])
    with torch.no_grad():
        plain = student(input_ids=ids).logits
    learned = beside.learn_scales(student, blocks)
    with torch.no_grad():  # unchanged scales: the same weights as the graph's
        torch.testing.assert_close(student(input_ids=ids).logits, plain, atol=1e-5, rtol=1e-5)
        for name, scales in learned.items():  # move every grid, the tied head's included
            gen = torch.Generator().manual_seed(len(name))
            scales.scale_change.copy_(0.05 * torch.randn(scales.scale_change.shape, generator=gen))
            # HQQ's float zero points train too; integer ones stay what the graph stores
            assert isinstance(scales.zero_change, torch.nn.Parameter) == (method == "hqq")
            if method == "hqq":
                scales.zero_change.copy_(0.3 * torch.randn(scales.zero_change.shape,
                                                           generator=gen))
        moved = student(input_ids=ids).logits
    assert (moved - plain).abs().max() > 1e-2
    embed = student.get_base_model().model.embed_tokens
    head = student.get_base_model().lm_head
    torch.testing.assert_close(embed.weight, head.weight)  # still tied through one grid
    for name, scales in learned.items():
        quantize.set_scales_4bit(model, name, blocks[name], *scales.scales())
    back = quantize.blocks_4bit(model)
    for name, scales in learned.items():
        np.testing.assert_array_equal(back[name].scales, scales.scales()[0])
        np.testing.assert_array_equal(back[name].codes, blocks[name].codes)
        np.testing.assert_array_equal(back[name].zeros, scales.scales()[1] if method == "hqq"
                                      else blocks[name].zeros)
    graph.save(model, found.path / "model.onnx")
    # the graph with the learned scales computes what torch trained (fp32 compute)
    np.testing.assert_allclose(plain_logits(found.path, ids[0].tolist()), moved[0].numpy(),
                               atol=2e-4, rtol=1e-4)


def test_a_full_rank_correction_gives_back_the_fp32_weights(baked_dir, tokenizer, tmp_path):
    # Rank 64 is every direction of the tiny model's 64-wide matrices: the SVD of the rounding
    # error then is the whole error, and the graph computes the unquantised bake (to the fp16
    # the correction is stored in). Checks the branches' orientation, wiring and storage.
    options = Int4Options(method="rtn", lora="beside", accuracy_level=0, head_bits=4,
                          correction_rank=64)
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", int4=options,
                         tolerances=TINY_INT4)
    model = onnx.load(str(found.path / "model.onnx"))
    blocks = quantize.blocks_4bit(model)
    record = found.manifest["int4"]["beside"]["correction"]
    assert record["rank"] == 64 and record["branches"] == len(blocks) == 15  # 2 x 7 + head
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if ".correction_" in i.name}
    assert len(stored) == 2 * 15 and all(v.dtype == np.float16 for v in stored.values())
    assert record["parameters"] == sum(v.size for v in stored.values())
    baked = load_baked(baked_dir)
    fp32 = beside.base_weights(baked.model, blocks)
    for name, block in blocks.items():
        error = fp32[name] - block.weight()
        c, d = stored[f"{name}.correction_A"], stored[f"{name}.correction_B"]
        left = error - (c.astype(np.float32) @ d.astype(np.float32)).T
        assert np.abs(left).max() < 0.02 * np.abs(error).max(), name
    merged = merged_model(load_baked(baked_dir), 1.0)
    ids = parity.default_prompts(tokenizer, count=1)[0]
    with torch.no_grad():
        want = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = plain_logits(found.path, ids)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    # ... where the 4-bit base with the LoRA alone is much further from it
    plain = export_baked(baked_dir, tmp_path / "plain", quantize="int4", tolerances=TINY_INT4,
                         int4=Int4Options(method="rtn", lora="beside", accuracy_level=0,
                                          head_bits=4))
    assert np.abs(plain_logits(plain.path, ids) - want).max() > 5 * np.abs(got - want).max()


def test_a_correction_trains_with_the_recovery_and_torch_computes_the_graph(baked_dir, tokenizer,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "Tolerances", functools.partial(
        parity.Tolerances, int4_top1=0.0, contexts=2, steps=8))
    options = Int4Options(method="hqq", lora="beside", accuracy_level=0, head_bits=4,
                          correction_rank=2, recover_steps=3, recover_contexts=3,
                          recover_scales=False, scale_storage="fp32")
    found = export_baked(baked_dir, tmp_path / "int4", quantize="int4", int4=options,
                         tolerances=TINY_INT4)
    record = found.manifest["int4"]["beside"]
    model = onnx.load(str(found.path / "model.onnx"))
    blocks = quantize.blocks_4bit(model)
    # 2 x (inputs + outputs) per 4-bit matrix, trained with the LoRA (the scales stayed)
    assert record["correction"]["parameters"] == sum(2 * (b.k + b.codes.shape[0])
                                                     for b in blocks.values())
    assert record["recovery"]["trainable_parameters"] == \
        record["parameters"] + record["correction"]["parameters"]
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    baked = load_baked(baked_dir)
    start = correction.initial(beside.base_weights(baked.model, blocks),
                               {n: b.weight() for n, b in blocks.items()}, 2)
    trained = {name: (stored[f"{name}.correction_A"], stored[f"{name}.correction_B"])
               for name in blocks}
    assert any(not np.array_equal(trained[n][1], start[n][1]) for n in blocks)
    # torch with the stored LoRA and corrections on the 4-bit base computes what the graph does
    lora = {name: (stored[f"{name}.lora_A"], stored[f"{name}.lora_B"])
            for name in merging.lora_factors(baked.model, 1.0)}
    student = beside.on_quantized_base(baked.model, {n: b.weight() for n, b in blocks.items()},
                                       1.0)
    layers = dict(student.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.items():
            layer = layers["base_model.model." + name]
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a).T)
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b).T / layer.scaling["default"])
    correction.attach(student, trained, tied=True)  # the tiny model ties its head
    ids = parity.default_prompts(tokenizer, count=1)[0]
    with torch.no_grad():
        want = student(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(plain_logits(found.path, ids), want, atol=2e-4, rtol=1e-4)
