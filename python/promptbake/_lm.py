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


def response_logits(model, sequences: list[list[int]], starts: list[int], pad_id: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits ``[tokens, V]`` predicting each response token, for all sequences in order.

    ``sequences[i][starts[i]:]`` is response i; the logits predicting it sit at positions
    ``starts[i] - 1 .. len - 2``. Only those rows go through the LM head, so prompt and padding
    positions cost the transformer body but no ``V``-wide projection.
    """
    inner = _inner(model)
    body, head = inner.base_model, inner.get_output_embeddings()
    device = head.weight.device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for i, s in enumerate(sequences):  # right padding: causal attention never sees it
        ids[i, :len(s)] = torch.tensor(s, device=device)
        mask[i, :len(s)] = 1
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = torch.cat([hidden[i, start - 1:len(s) - 1] for i, (s, start)
                          in enumerate(zip(sequences, starts))])
        logits = head(rows)
    return logits.float()


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
