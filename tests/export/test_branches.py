"""The terms beside the 4-bit MatMuls fused by input (``export.branches``): the same results as
the terms added one by one, in fewer nodes, with the factors still stored under their names."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from promptbake.export import Int4Options, Tolerances, branches, export_baked, graph


def outputs(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_fused_terms_compute_what_the_separate_terms_did(baked_dir, tmp_path, monkeypatch):
    # HQQ's folded zero points, the bake's LoRA and a rank-2 correction: three kinds of term
    options = Int4Options(method="hqq", lora="beside", correction_rank=2, accuracy_level=0)
    with monkeypatch.context() as patch:
        patch.setattr(branches, "fuse", lambda model: 0)
        found = export_baked(baked_dir, tmp_path / "separate", quantize="int4", int4=options,
                             tolerances=Tolerances(int4_top1=0.0, contexts=2, steps=4))
    separate = onnx.load(str(found.path / "model.onnx"))
    fused = copy.deepcopy(separate)
    zero_terms = sum(n.name.endswith("_zero_term/centred") for n in separate.graph.node)
    lora = sum(n.name.endswith(".lora/add") for n in separate.graph.node)
    corrections = sum(n.name.endswith(".correction/add") for n in separate.graph.node)
    assert zero_terms == 14 and lora == 8 and corrections > 0  # 2 layers x 7; 4 x 2
    assert branches.fuse(fused) == zero_terms + lora + corrections
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    # per input, one MatMul by the joined L factors; per 4-bit MatMul, one by its R rows
    assert count(fused, "MatMul") < count(separate, "MatMul") - lora
    assert count(fused, "Add") == count(separate, "Add") - lora - corrections
    # the factors are stored as they were: nothing added but the zeros' shapes
    stored = {i.name: numpy_helper.to_array(i) for i in separate.graph.initializer}
    for init in fused.graph.initializer:
        if init.name in stored:
            np.testing.assert_array_equal(numpy_helper.to_array(init), stored[init.name])
        else:
            assert init.name.startswith(branches.FUSED + "shape_")
    onnx.checker.check_model(fused)
    past = [i for i in separate.graph.input if i.name.startswith("past_key_values.")]
    kv_heads, head_dim = (past[0].type.tensor_type.shape.dim[k].dim_value for k in (1, 3))
    rng = np.random.default_rng(0)
    for batch, new, cached in [(1, 6, 0), (1, 1, 6), (2, 3, 4)]:
        feed = {"input_ids": rng.integers(0, 400, (batch, new)),
                "attention_mask": np.ones((batch, cached + new), np.int64),
                "position_ids": np.tile(np.arange(cached, cached + new), (batch, 1))}
        for name in graph.past_names(len(past) // 2):
            feed[name] = rng.standard_normal((batch, kv_heads, cached, head_dim)).astype(
                np.float32)
        for a, b in zip(outputs(fused, feed), outputs(separate, feed), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_a_graph_without_terms_is_left_as_it_is():
    node = onnx.helper.make_node("Neg", ["x"], ["y"])
    f = onnx.TensorProto.FLOAT
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [node], "plain", [onnx.helper.make_tensor_value_info("x", f, [2])],
        [onnx.helper.make_tensor_value_info("y", f, [2])]))
    before = model.SerializeToString()
    assert branches.fuse(model) == 0
    assert model.SerializeToString() == before
