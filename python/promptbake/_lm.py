"""Plumbing around a causal LM: logits at response positions only, and the LoRA adapter's state.

One copy of the weights serves teacher and student: the teacher is the model with the adapter
disabled, the student the model with it enabled (optionally at a strength alpha, which scales the
LoRA delta: the half-baked model).
"""

from __future__ import annotations

import contextlib

import torch


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def left_padded(prefixes: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, position ids), each ``[len(prefixes), longest]``: every prefix ends
    at the last column, so the next token of all of them is predicted at the same place."""
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def right_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask), each ``[len(sequences), longest]``, padding at the end."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, :len(s)] = 1
    return ids, mask


def next_step(model, cache, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
              alive: list, still: list[int]):
    """One step of batched incremental decoding: the rows not in ``still`` (finished) leave the
    batch and the cache, then the kept rows' chosen ``tokens`` are fed. ``alive`` maps batch rows
    to the caller's sequences. Returns (model output, mask, position, alive) for the next step."""
    if len(still) < len(alive):
        keep = torch.tensor(still, device=tokens.device)
        cache.batch_select_indices(keep)
        tokens, mask, position = tokens[keep], mask[keep], position[keep]
        alive = [alive[r] for r in still]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    position = position + 1
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                past_key_values=cache, use_cache=True)
    return out, mask, position, alive


def response_logits(model, prefixes: list[list[int]], responses: list[list[list[int]]],
                    pad_id: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits ``[tokens, V]`` (fp32, or fp64 for a fp64 model) predicting every response token.

    ``responses[i]`` are the responses that follow ``prefixes[i]`` (the samples of one context);
    rows come out response by response: prefix 0's responses in order, then prefix 1's, ... Each
    prefix goes through the model once and its KV cache, autograd history included, serves all of
    its responses, so a context's prompt tokens cost one forward and one backward however many
    samples follow them (the same logits and gradients as whole sequences: tested). Only
    response positions reach the LM head. ``dtype``: autocast dtype for the matmuls (None: fp32).
    """
    if len(prefixes) != len(responses) or not all(prefixes) or \
            not all(group and all(group) for group in responses):
        raise ValueError("every prefix needs at least one token and one or more non-empty "
                         "responses")
    inner = _inner(model)
    body, head = inner.base_model, inner.get_output_embeddings()
    device = head.weight.device
    # Right padding throughout (prompts, then responses): every query row, padding included, sees
    # at least one real token, so no attention row is fully masked (NaN-prone in eager attention).
    ids, mask = right_padded(prefixes, pad_id, device)
    ends = torch.tensor([len(p) for p in prefixes], device=device)
    owner = torch.tensor([i for i, group in enumerate(responses) for _ in group], device=device)
    flat = [r for group in responses for r in group]
    # y_t is predicted from y_<t: the inputs after the prompt are y_0 .. y_{n-2}.
    r_ids, r_mask = right_padded([r[:-1] for r in flat], pad_id, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = body(input_ids=ids, attention_mask=mask, use_cache=r_ids.shape[1] > 0)
        first = out.last_hidden_state[owner, ends[owner] - 1]  # the prompt's end predicts y_0
        if r_ids.shape[1] > 0:
            cache = out.past_key_values
            cache.batch_select_indices(owner)  # an indexing op: gradients flow to the prompt
            positions = ends[owner, None] + torch.arange(r_ids.shape[1], device=device)
            rest = body(input_ids=r_ids, attention_mask=torch.cat([mask[owner], r_mask], dim=1),
                        position_ids=positions, past_key_values=cache).last_hidden_state
        rows = torch.cat([torch.cat([first[k:k + 1], rest[k, :len(r) - 1]]) if len(r) > 1
                          else first[k:k + 1] for k, r in enumerate(flat)])
        logits = _finish(inner.config, head(rows))
    return logits if logits.dtype == torch.float64 else logits.float()


def _finish(config, logits: torch.Tensor) -> torch.Tensor:
    """What some architectures do to the LM head's output (Gemma's soft-capping, Granite's and
    Cohere's scaling), so that ``response_logits`` are the model's own logits."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    return logits


@torch.no_grad()
def check_logits(model, ids: list[int]) -> None:
    """Refuses a model whose logits ``response_logits`` would not reproduce (an architecture that
    transforms its LM head's output in a way ``_finish`` does not know)."""
    full = model(input_ids=torch.tensor([ids], device=_inner(model).device)).logits[0, :-1]
    ours = response_logits(model, [ids[:1]], [[ids[1:]]], pad_id=0)
    gap = float((full.float() - ours).abs().max())
    if gap > 1e-3 * max(1.0, float(full.abs().max())):
        raise ValueError(f"this {_inner(model).config.model_type} model's logits differ from its "
                         f"LM head's output by up to {gap:.3g} after the known post-processing: "
                         f"promptbake cannot compute its logits at response positions exactly")


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapter(model, enabled: bool = True, strength: float = 1.0):
    """Runs the block with the LoRA adapter disabled (the base model) or enabled at ``strength``."""
    if not hasattr(model, "disable_adapter"):
        if enabled:
            raise ValueError("this model has no LoRA adapter to enable")
        yield model
        return
    if not enabled:
        with model.disable_adapter():
            yield model
        return
    layers = lora_layers(model)
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.set_scale(name, strength)
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def snapshot_steps(path) -> list[tuple[int, object]]:
    """(step, directory) of every half-baked snapshot in a baked directory, by step."""
    from pathlib import Path

    found = [(int(d.name.split("-")[-1]), d) for d in (Path(path) / "snapshots").glob("step-*")
             if (d / "adapter_model.safetensors").is_file()]
    return sorted(found)


@contextlib.contextmanager
def adapter_weights(model, directory):
    """Runs the block with the LoRA weights of another adapter directory (a snapshot) in place
    of the model's own; the model's own weights are back afterwards."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    own = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    try:
        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        yield model
    finally:
        set_peft_model_state_dict(model, own)


@contextlib.contextmanager
def for_training(model, dtype: torch.dtype | None):
    """The fastest way to run the training forward and backward here, with the same results.

    * On CPU, eager attention: its backward is ~1.4x faster than SDPA's flash kernel at bake
      lengths (a hundred-odd tokens per sequence; ``python bench/ --only bake`` times both).
    * With bf16 matmuls, the frozen linear weights are held in bf16 for the duration, so autocast
      does not cast each of them again in every step: the same bf16 values it would make. The
      output embedding (often tied to the input one) stays fp32, and the fp32 originals come
      back afterwards.
    """
    inner = _inner(model)
    attention = inner.config._attn_implementation
    if inner.device.type == "cpu" and attention != "eager":
        inner.set_attn_implementation("eager")
    saved = []
    if dtype is not None:
        head = inner.get_output_embeddings()
        for module in inner.modules():
            if isinstance(module, torch.nn.Linear) and module is not head \
                    and not module.weight.requires_grad and module.weight.dtype == torch.float32:
                saved.append((module.weight, module.weight.data))
                module.weight.data = module.weight.data.to(dtype)
    try:
        yield model
    finally:
        for weight, data in saved:
            weight.data = data
        if inner.config._attn_implementation != attention:
            inner.set_attn_implementation(attention)
