"""The baked model as plain transformers weights: the LoRA delta merged in at a strength.

W' = W + strength * (lora_alpha / r) * B A for every adapted layer: strength 0 is the base model, 1
the bake, values between are half-baked (the same scaling ``load_baked(dir, strength=...)``
applies to the unmerged adapter). ``lora_factors`` gives the delta as its two factors instead, for
the exports that keep it beside the base weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from promptbake import files, modeling
from promptbake.artifact import Baked, load_baked, merged_model, sources, write_merged

log = logging.getLogger("promptbake")

PREFIX = "base_model.model."  # a PeftModel's name for the transformers model's modules


def _as_baked(baked, strength: float):
    """(Baked, whether it was loaded here and may be consumed)."""
    if isinstance(baked, Baked):
        return baked, False
    if not isinstance(baked, (str, Path)):
        raise ValueError(  # noqa: TRY004 (promptbake raises ValueErrors)
            f"expected a promptbake.Baked or a bake's directory, got {type(baked).__name__}")
    return load_baked(baked, strength=strength), True


def merge(baked, strength: float = 1.0):
    """A transformers causal LM (eval mode) with the adapter merged at ``strength``.

    ``baked``: a ``promptbake.Baked``, left as it was (the merge works on a copy), or a bake's
    directory.
    """
    baked, owned = _as_baked(baked, strength)
    return merged_model(baked, strength, in_place=owned)


def save_merged(baked, out: str | Path, strength: float = 1.0, *,
                overwrite: bool = False) -> Path:
    """Writes the merged model as a safetensors model directory (weights, config, tokenizer and
    ``manifest.json``) that ``AutoModelForCausalLM.from_pretrained(out)`` loads alone.

    The directory is written under a temporary name and renamed into place. An existing
    ``out`` is replaced only with ``overwrite``, and only when it is an earlier export holding
    nothing else (``files.check_output``); ``out`` may not be, hold or lie inside the bake.
    """
    out = Path(out)
    files.check_output(out, overwrite=overwrite, sources=sources(baked))
    baked, owned = _as_baked(baked, strength)
    return write_merged(baked, out, strength, in_place=owned)


def lora_factors(peft_model, strength: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module name: (A [K, r], B [r, N])}`` of every LoRA layer at ``strength``, so that
    x @ A @ B is the layer's delta (the scaling, strength * alpha / r, folded into B); names
    as in the transformers model (``model.layers.0.self_attn.q_proj``). What the exports that
    keep the LoRA beside the base weights write: ONNX int4 (``beside.py``) and the GGUF
    adapter (``gguf.py``)."""
    out = {}
    layers = set(map(id, modeling.lora_layers(peft_model)))
    with modeling.adapter(peft_model, strength=strength):
        for name, layer in peft_model.named_modules():
            if id(layer) not in layers:
                continue
            (adapter,) = layer.active_adapters
            if layer.use_dora.get(adapter):
                raise ValueError(f"{name} is a DoRA layer: only plain LoRA can be kept beside "
                                 f"the base weights; merge it (ONNX int4: lora='merge', GGUF: "
                                 f"--gguf-lora merge)")
            a = layer.lora_A[adapter].weight.detach().float()  # [r, K]
            b = layer.lora_B[adapter].weight.detach().float() * layer.scaling[adapter]  # [N, r]
            out[name.removeprefix(PREFIX)] = (a.T.numpy(), b.T.numpy())
    return out
