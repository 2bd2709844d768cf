"""Shared shape arithmetic in the traced graph (``export.shapes``): the same results at every
size a caller feeds, the layers' copies gone, a size no fit explains left in place, and the
graph rewrites it uses (``export.rewrite``): merging duplicates keeps what must not be merged."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from promptbake.export import graph, rewrite, shapes


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    return session.run(None, {k: v for k, v in feed.items() if k in names})


def feeds(layers, kv_heads, head_dim):
    """Prefills and decode steps at several batch sizes, with left padding and with
    ``logits_to_keep`` fed or not."""
    rng = np.random.default_rng(0)
    for batch, new, cached, keep in [(1, 5, 0, None), (2, 1, 7, None), (3, 4, 6, 2),
                                     (1, 1, 12, 1), (2, 6, 3, 0)]:
        mask = np.ones((batch, cached + new), np.int64)
        mask[1:, :2] = 0  # padding in all but the first row
        feed = {"input_ids": rng.integers(0, 400, (batch, new)), "attention_mask": mask,
                "position_ids": np.tile(np.arange(cached, cached + new), (batch, 1))}
        if keep is not None:
            feed["logits_to_keep"] = np.array(keep, np.int64)
        for name in graph.past_names(layers):
            feed[name] = rng.standard_normal((batch, kv_heads, cached, head_dim)).astype(
                np.float32)
        yield feed


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_shapes_give_the_same_results_with_one_copy_of_the_arithmetic(kind, tmp_path,
                                                                            monkeypatch):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64,
                                             intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4,
                                           bos_token_id=0, eos_token_id=0))
    graph.trace(model.eval(), tmp_path / "shared.onnx")
    with monkeypatch.context() as patch:
        patch.setattr(shapes, "share", lambda model, past: {})
        graph.trace(model, tmp_path / "traced.onnx")
    shared, traced = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in ("shared", "traced"))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(traced, "Shape") > 3 * 5  # chains per view, per layer
    assert count(shared, "Shape") <= 3  # batch, new tokens, cached tokens: once each
    assert len(shared.graph.node) < 0.6 * len(traced.graph.node)
    assert [i.name for i in shared.graph.input] == [i.name for i in traced.graph.input]
    assert [o.name for o in shared.graph.output] == [o.name for o in traced.graph.output]
    layers, kv_heads, head_dim = graph.cache_layout(model.config)
    for feed in feeds(layers, kv_heads, head_dim):
        for a, b in zip(run(shared, feed), run(traced, feed), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _toy() -> onnx.ModelProto:
    """A graph over a KV-cache graph's inputs with one size no fit explains (the past flattened:
    8 b p entries), one that is b and s, and two Adds that compute the same thing from equal
    constants stored twice."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("Reshape", ["past_key_values.0.key", "flat"], ["flattened"]),
        helper.make_node("Shape", ["flattened"], ["odd_shape"]),
        helper.make_node("ConstantOfShape", ["odd_shape"], ["zeros"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Cast", ["ids_shape"], ["ids_shape_f"], to=f),
        helper.make_node("Add", ["ids_shape_f", "one_a"], ["plus_a"]),
        helper.make_node("Add", ["ids_shape_f", "one_b"], ["plus_b"]),
        helper.make_node("Mul", ["plus_a", "plus_b"], ["square"]),
    ]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one_a"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one_b")]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", i64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", i64, ["b", "s"]),
              helper.make_tensor_value_info("past_key_values.0.key", f, ["b", 2, "p", 4])]
    outputs = [helper.make_tensor_value_info("zeros", f, None),
               helper.make_tensor_value_info("square", f, None)]
    return helper.make_model(helper.make_graph(nodes, "toy", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_a_size_no_fit_explains_keeps_its_shape_node():
    model = _toy()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    report = shapes.share(model, "past_key_values.0.key")
    assert report["shape_nodes_replaced"] == 1  # ids_shape, which is (b, s)
    readers = {n.input[0] for n in model.graph.node if n.op_type == "Shape"}
    assert "flattened" in readers and "input_ids" in readers  # kept, and the shared b and s
    assert sum(n.op_type == "Add" and "plus" in n.output[0] for n in model.graph.node) == 1
    for feed in feeds(1, 2, 4):
        feed.pop("logits_to_keep", None)
        for a, b in zip(run(model, feed), run(before, feed), strict=True):
            np.testing.assert_array_equal(a, b)


def test_merging_keeps_random_operators_and_graph_outputs():
    f = TensorProto.FLOAT
    nodes = [helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
             helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
             helper.make_node("Neg", ["x"], ["out1"]),
             helper.make_node("Neg", ["x"], ["out2"]),
             helper.make_node("Abs", ["x"], ["a1"]),
             helper.make_node("Abs", ["x"], ["a2"]),
             helper.make_node("Sum", ["r1", "r2", "a1", "a2"], ["total"])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out1", "out2", "total")]
    model = helper.make_model(helper.make_graph(
        nodes, "merge", [helper.make_tensor_value_info("x", f, [3])], outputs))
    assert rewrite.merge_duplicates(model.graph) == 1  # the second Abs only
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("RandomUniformLike") == 2 and kinds.count("Neg") == 2
    assert kinds.count("Abs") == 1
    assert model.graph.node[-1].input[:] == ["r1", "r2", "a1", "a1"]


def test_a_large_graph_is_probed_through_a_file_and_comes_back_whole(monkeypatch):
    # above the limit the probe writes the graph with its weights beside it, which moves them
    # out of the model in memory: they must be back, and the probe's outputs gone, after
    monkeypatch.setattr(rewrite, "INLINE_LIMIT", 0)
    model = _toy()
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert shapes.share(model, "past_key_values.0.key")["shape_nodes_replaced"] == 1
    assert [o.name for o in model.graph.output] == ["zeros", "square"]
    for init in model.graph.initializer:
        assert init.data_location == TensorProto.DEFAULT and not init.external_data
        if init.name in before:
            np.testing.assert_array_equal(numpy_helper.to_array(init), before[init.name])
    feed = next(feeds(1, 2, 4))
    run(model, feed)


def test_a_size_that_follows_logits_to_keep_is_probed_with_it_even_as_an_initializer():
    # logits_to_keep as an exported graph has it: an input with a default (an initializer of the
    # same name), which onnxruntime lists apart from the inputs; a size read from it must vary
    # in the probes, or it would be fitted as the default's constant
    i64 = TensorProto.INT64
    nodes = [helper.make_node("Shape", ["input_ids"], ["batch"], start=0, end=1),
             helper.make_node("Reshape", ["logits_to_keep", "one"], ["keep"]),
             helper.make_node("Concat", ["batch", "keep"], ["size"], axis=0),
             helper.make_node("ConstantOfShape", ["size"], ["kept"]),
             helper.make_node("Shape", ["kept"], ["kept_shape"]),
             helper.make_node("Identity", ["kept_shape"], ["out"])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(0, np.int64), "logits_to_keep")]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", i64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", i64, ["b", "s"]),
              helper.make_tensor_value_info("logits_to_keep", i64, []),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                            ["b", 2, "p", 4])]
    model = helper.make_model(helper.make_graph(
        nodes, "keep", inputs, [helper.make_tensor_value_info("out", i64, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    shapes.share(model, "past_key_values.0.key")
    feed = next(feeds(1, 2, 4))
    feed["logits_to_keep"] = np.array(3, np.int64)
    assert run(model, feed)[0].tolist() == [1, 3]
