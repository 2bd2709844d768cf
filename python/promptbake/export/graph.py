"""The ONNX graph of a causal LM with a KV cache: one graph for prefill and incremental decode.

Inputs: ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past + seq] int64,
``position_ids`` [batch, seq] int64 and ``past_key_values.{i}.key`` / ``.value`` [batch,
kv_heads, past, head_dim] per layer (past 0 for a prefill): the names and shapes a generic
KV-cache loop (Optimum's, or one written by hand) feeds. ``logits_to_keep`` (int64 scalar) is
optional, an overridable initializer that defaults to 0, every position, as a generic consumer
expects; promptbake's own loop feeds 1 so a prefill pays the LM head for its last position only.
Outputs: ``logits`` [batch, kept, vocab] and ``present.{i}.key`` / ``.value`` [batch,
kv_heads, past + seq, head_dim].

The graph is traced by torch's TorchScript exporter through a wrapper (``_Step``) that rebuilds
a transformers ``DynamicCache`` from the flat tensors: ~1-3 s for the tiny test models and ~1 min
for SmolLM2-135M on a busy 2-core CPU. The dynamo exporter (torch 2.13) was tried: torch.export
rejects the data-dependent slice ``logits_to_keep`` needs, and even without it took ~45 s for
the tiny model (same logits). Tracing records one path through Python branches, so the parity
check of every export runs the graph on the shapes it must serve (a prefill without a past,
decode steps with one) against torch. The tracer's per-layer size arithmetic is then replaced by
one shared computation of each size (``shapes.share``: a fifth faster int8 decoding on
SmolLM2-135M, the same results to the bit). The attention traced is ``ops.attention``'s, with
a rotary embedding written for the graph (``grouped_rotary``): the same results as
transformers' eager attention, without a copy of the whole cache per query head at every step
(grouped-query models) and with fewer nodes per layer.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.onnx import operators as onnx_operators

from promptbake import modeling
from promptbake.export import rewrite, shapes

try:
    import onnx
except ImportError as err:  # an optional dependency
    raise ImportError("ONNX export needs the onnx extra: pip install 'promptbake[onnx]'") from err

log = logging.getLogger("promptbake")

SUPPORTED = ("llama", "gpt2")  # model_type values the exporter is tested on
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_to_keep")
KEEP = "logits_to_keep"  # optional: an initializer (0, every position) a caller may override
TIED_HEAD = "lm_head.weight_t"  # a tied head's [hidden, vocab] weight, read by both its uses


class UnsupportedArchitecture(ValueError):
    """The exporter has not been tested on this model type."""


def check_supported(model) -> str:
    """The model's ``model_type``, or ``UnsupportedArchitecture`` naming the supported ones."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"cannot export a {kind or type(model).__name__!r} model to ONNX: the exporter "
            f"supports {', '.join(SUPPORTED)} (Llama-architecture models such as SmolLM2, and "
            f"GPT-2); export it as merged safetensors instead (--format safetensors)")
    return kind


def cache_layout(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the KV cache."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def prefill_feed(ids, past: dict[str, tuple[int, int]]) -> dict:
    """What a generic consumer feeds on its first pass over one sequence: ``ids``, a mask of
    ones, positions 0.. and an empty KV cache (``past``: each past input's name -> (key/value
    heads, head dim)); ``logits_to_keep`` stays at its default, the last position."""
    ids = np.asarray([list(ids)], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    feed.update({name: np.zeros((1, heads, 0, dim), np.float32)
                 for name, (heads, dim) in past.items()})
    return feed


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def tied(model) -> bool:
    """True when the LM head shares its weight with the input embedding (SmolLM2, GPT-2)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and \
        head.weight.data_ptr() == embed.weight.data_ptr()


class _Step(torch.nn.Module):
    """One forward pass with a KV cache, over flat tensors (what an ONNX graph takes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        self.layers = cache_layout(model.config)[0]
        self.tied = tied(model)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        options = {"attention_mask": attention_mask, "position_ids": position_ids,
                   "cache": cache, "use_cache": True}
        if self.tied:
            # The embedding is read from the transposed head weight, the LM head's own operand,
            # so the graph stores the shared matrix once (the exporter would otherwise fold
            # the head's transpose into a second copy) and int8 quantisation can keep it once.
            weight_t = self.head.weight.t()
            embeds = weight_t[:, input_ids].permute(1, 2, 0)
            out = self.body(inputs_embeds=embeds, **options)
        else:
            out = self.body(input_ids=input_ids, **options)
        hidden = out.last_hidden_state
        # 0 (the default) keeps every position; traced through Shape, so it follows seq
        length = onnx_operators.shape_as_tensor(hidden)[1]
        keep = torch.where(logits_to_keep > 0, torch.minimum(logits_to_keep, length), length)
        hidden = hidden.narrow(1, length - keep, keep)
        if self.tied:
            logits = hidden @ weight_t
            if getattr(self.head, "bias", None) is not None:
                logits = logits + self.head.bias
        else:
            logits = self.head(hidden)
        logits = modeling.finish_logits(self.model.config, logits)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


GROUPED = modeling.GROUPED  # the attention traced by default (ops.attention)


def grouped_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """Rotary position embedding as transformers' Llama ``apply_rotary_pos_emb`` computes it,
    ``x * cos + rotate_half(x) * sin``, written for the graph: ``rotate_half(x)`` (the halves
    swapped, the first negated) is one ``Gather`` of the swapped halves, and the negation goes
    into ``sin`` once for every layer: 4 nodes per rotation where the tracer writes 7 (two
    Slices, a Neg and a Concat), the same products and sums."""
    dim = int(q.shape[-1])  # constants in the graph, each layer's copies (and of ``signed``)
    half = dim // 2  # merged into one by ``rewrite.merge_duplicates`` after the trace
    index = torch.cat([torch.arange(half, dim), torch.arange(half)]).to(q.device)
    sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(q.device, sin.dtype)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    signed = sin * sign
    return (q * cos + q.index_select(-1, index) * signed,
            k * cos + k.index_select(-1, index) * signed)


@contextlib.contextmanager
def _attention(model, implementation: str):
    """``model`` traced with ``implementation``; with ``GROUPED``, a Llama model's rotary
    embedding is ``grouped_rotary`` too (its attention calls the module's function by name)."""
    rotary = None
    layers = getattr(model.base_model, "layers", None)
    if implementation == GROUPED and model.config.model_type == "llama" and layers:
        module = sys.modules[type(layers[0].self_attn).__module__]
        rotary = module if hasattr(module, "apply_rotary_pos_emb") else None
    if rotary is not None:
        original, rotary.apply_rotary_pos_emb = rotary.apply_rotary_pos_emb, grouped_rotary
    try:
        with modeling.use_attention(model, implementation):
            yield
    finally:
        if rotary is not None:
            rotary.apply_rotary_pos_emb = original


@torch.no_grad()
def trace(model, path: Path, *, opset: int = OPSET, attention: str = GROUPED) -> None:
    """Writes the fp32 graph of ``model`` (a transformers causal LM on CPU) to ``path``.

    ``attention``: the attention traced: ``GROUPED`` (``ops.attention.grouped_attention``: no
    copy of the cache per query head) or a transformers implementation (``sdpa``, ``eager``);
    each becomes plain ONNX MatMul/Softmax attention.
    """
    check_supported(model)
    path = Path(path)
    layers, kv_heads, head_dim = cache_layout(model.config)
    # Trace shapes unlike each other and unlike any model dimension, so that a size the tracer
    # sees can be told apart from a constant.
    batch, seq, past = 3, 5, 7
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    cache = [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * layers)]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "kept"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past_names(layers)})
    axes.update({name: {0: "batch", 2: "total"} for name in present_names(layers)})
    step = _Step(model).eval()
    scratch = path.parent / (path.name + ".trace")
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with _attention(model, attention), warnings.catch_warnings():
            # The tracer warns at every Python branch it records; the parity check that
            # follows every export is what establishes that the recorded paths serve all shapes.
            warnings.simplefilter("ignore")
            torch.onnx.export(step, (ids, mask, positions, torch.tensor(2), *cache),
                              str(scratch / "model.onnx"), dynamo=False, opset_version=opset,
                              do_constant_folding=True,
                              input_names=list(INPUTS) + past_names(layers),
                              output_names=["logits"] + present_names(layers), dynamic_axes=axes)
        graph = onnx.load(str(scratch / "model.onnx"))  # with any external data torch wrote
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if step.tied:
        _name_tied_head(graph)
    shapes.share(graph, past_names(layers)[0])  # before _default_keep: the probes vary it
    _default_keep(graph)
    save(graph, path)
    log.info("traced %s (%d layers) to %s", model.config.model_type, layers, path)


GENAI_TYPES = {"llama": "llama"}  # model_type -> onnxruntime-genai's model type (tested)


def genai_config(config, tokenizer) -> dict | None:
    """The ``genai_config.json`` with which onnxruntime-genai (``og.Model(dir)``) runs the
    export: this graph's input and output names, cache layout and special tokens; None for an
    architecture it is not tested on."""
    if config.model_type not in GENAI_TYPES:
        return None
    layers, kv_heads, head_dim = cache_layout(config)

    def token(name):
        found = getattr(tokenizer, name, None)
        return found if found is not None else getattr(config, name, None)

    eos = token("eos_token_id")
    return {"model": {
        "type": GENAI_TYPES[config.model_type], "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings, "bos_token_id": token("bos_token_id"),
        "eos_token_id": eos, "pad_token_id": token("pad_token_id") or eos,
        "decoder": {
            "filename": "model.onnx", "head_size": head_dim, "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads, "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key",
                       "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "num_beams": 1, "max_length": config.max_position_embeddings,
                   "past_present_share_buffer": False}}


def _default_keep(graph: onnx.ModelProto) -> None:
    """Makes ``logits_to_keep`` optional: an initializer of the same name as the input (0,
    every position) is what onnxruntime uses when a caller does not feed it."""
    from onnx import helper

    graph.graph.initializer.append(helper.make_tensor(KEEP, onnx.TensorProto.INT64, [], [0]))


def _name_tied_head(graph: onnx.ModelProto) -> None:
    """Names the tied head's transposed weight ``TIED_HEAD`` (the tracer calls it
    ``onnx::Gather_N``): the one initializer read by the embedding lookup and a MatMul."""
    inits = {i.name for i in graph.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in graph.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, set()).add(node.op_type)
    found = [name for name, ops in readers.items() if {"Gather", "MatMul"} <= ops]
    if len(found) != 1:
        raise AssertionError(f"expected one tied head weight in the traced graph, found {found}")
    for init in graph.graph.initializer:
        if init.name == found[0]:
            init.name = TIED_HEAD
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name == found[0]:
                node.input[i] = TIED_HEAD


def save(graph: onnx.ModelProto, path: Path) -> None:
    """Writes ``graph`` to ``path``; weights go to ``path.data`` beside it when the file would
    pass protobuf's 2 GB limit."""
    path = Path(path)
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    weights = sum(len(t.raw_data) for t in graph.graph.initializer)
    onnx.save_model(graph, str(path), save_as_external_data=weights > rewrite.INLINE_LIMIT,
                    all_tensors_to_one_file=True, location=path.name + ".data")
