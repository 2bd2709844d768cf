"""The traced graph's attention (``ops.attention.grouped_attention``, ``graph.grouped_rotary``):
transformers' rotary embedding's results, and a graph with no copy of the cache per query head
and fewer nodes per layer."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from promptbake.export import graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rotary_gives_transformers_rotary_to_the_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 3, 16, generator=gen), torch.randn(2, 2, 3, 16, generator=gen)
    angles = torch.randn(2, 3, 8, generator=gen)
    cos, sin = (torch.cat([f(angles)] * 2, -1) for f in (torch.cos, torch.sin))
    args = [t.to(dtype) for t in (q, k, cos, sin)]
    for got, want in zip(graph.grouped_rotary(*args), apply_rotary_pos_emb(*args), strict=True):
        assert torch.equal(got, want)


def test_the_graph_attends_to_the_cache_without_copying_it_per_head(tiny_dir, tmp_path):
    llama = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert llama.config.num_attention_heads > llama.config.num_key_value_heads  # GQA
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb
    runs = {}
    for attention in (graph.GROUPED, "sdpa"):
        path = tmp_path / attention / "model.onnx"
        path.parent.mkdir()
        graph.trace(llama, path, attention=attention)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        runs[attention] = (ops, ort.InferenceSession(str(path),
                                                     providers=["CPUExecutionProvider"]))
    layers, kv_heads, head_dim = graph.cache_layout(llama.config)
    # sdpa's repeat_kv expands each layer's keys and values; the grouped graph has no such copy
    expands = {name: ops.count("Expand") for name, (ops, _) in runs.items()}
    assert expands[graph.GROUPED] <= expands["sdpa"] - 2 * layers
    # and rotate_half's Slice, Slice, Neg, Concat are one Gather, for queries and keys
    assert "Neg" not in runs[graph.GROUPED][0]
    assert len(runs[graph.GROUPED][0]) <= len(runs["sdpa"][0]) - 8 * layers
    # the model and transformers are left as they were
    assert llama.config._attn_implementation != graph.GROUPED
    assert modeling_llama.apply_rotary_pos_emb is rotary
    # plain ONNX: no operator of onnxruntime's own domain in the fp32 graph
    assert {n.domain for n in onnx.load(str(tmp_path / graph.GROUPED / "model.onnx")).graph.node
            } <= {"", "ai.onnx"}
    # a left-padded prefill of two rows, then a decode step on its cache
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": np.maximum(mask.cumsum(-1) - 1, 0)}
    feed.update(dict.fromkeys(graph.past_names(layers),
                              np.zeros((2, kv_heads, 0, head_dim), np.float32)))
    outs = {}
    for attention, (_, session) in runs.items():
        logits, *present = session.run(None, feed)
        step = {"input_ids": np.array([[9], [10]], np.int64),
                "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                "position_ids": np.array([[3], [5]], np.int64),
                **dict(zip(graph.past_names(layers), present))}
        outs[attention] = (logits, session.run(None, step)[0])
    with torch.no_grad():
        want = llama(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(feed["position_ids"])).logits.numpy()
    # every position but the padding's (whose outputs no one reads, and each computes its own)
    (prefill, decode), (sdpa_prefill, sdpa_decode) = outs[graph.GROUPED], outs["sdpa"]
    for got, other in ((prefill[0, 2:], sdpa_prefill[0, 2:]), (prefill[1], sdpa_prefill[1]),
                       (decode, sdpa_decode), (prefill[0, 2:], want[0, 2:]), (prefill[1], want[1])):
        np.testing.assert_allclose(got, other, rtol=0, atol=1e-5)
