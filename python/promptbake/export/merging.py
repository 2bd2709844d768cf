"""The baked model as plain transformers weights: the LoRA delta merged in at a strength alpha.

W' = W + alpha * (lora_alpha / r) * B A for every adapted layer: strength 0 is the base model, 1
the bake, values between are half-baked (the same scaling ``load_baked(dir, strength=...)``
applies to the unmerged adapter).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

from promptbake import _files, _lm

log = logging.getLogger("promptbake")

MANIFEST = "manifest.json"


def _as_baked(baked, strength: float):
    """(Baked, whether it was loaded here and may be consumed)."""
    from promptbake.bake import Baked, load_baked

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
    return _merged(baked, strength, in_place=owned)


def _merged(baked, strength: float, in_place: bool):
    if not math.isfinite(strength):
        raise ValueError(f"strength={strength} must be a finite number (1 is the full bake)")
    # merge_and_unload rewrites the base weights and removes the adapter: a Baked the caller
    # keeps is merged on a copy.
    model = baked.model if in_place else copy.deepcopy(baked.model)
    for layer in _lm.lora_layers(model):
        for name in layer.scaling:
            layer.set_scale(name, float(strength))  # what merge_and_unload multiplies B A by
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def save_merged(baked, out: str | Path, strength: float = 1.0, *,
                overwrite: bool = False) -> Path:
    """Writes the merged model as a safetensors model directory (weights, config, tokenizer and
    ``manifest.json``) that ``AutoModelForCausalLM.from_pretrained(out)`` loads alone.

    The directory is written under a temporary name and renamed into place. An existing
    ``out`` is replaced only with ``overwrite``, and only when it is an earlier export holding
    nothing else (``_files.check_output``); ``out`` may not be, hold or lie inside the bake.
    """
    out = Path(out)
    source = baked.path if hasattr(baked, "path") else baked
    _files.check_output(out, overwrite=overwrite, sources=(source,))
    baked, owned = _as_baked(baked, strength)
    return write_merged(baked, out, strength, in_place=owned)


def write_merged(baked, out: Path, strength: float, *, in_place: bool = False) -> Path:
    """``save_merged`` without the checks of ``out``: for a caller that owns ``out`` (a bake's
    ``merged/``)."""
    model = _merged(baked, strength, in_place=in_place)
    manifest = {"format": 1, "kind": "merged", "strength": float(strength),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": source_record(baked)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        baked.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(_files.to_json(manifest, indent=2))

    _files.replace_dir(out, write, kind="merged")
    log.info("wrote the model merged at strength %g to %s", strength, out)
    return out


def source_record(baked) -> dict:
    """What an export records about the bake it came from."""
    manifest = baked.manifest or {}
    return {"bake": str(Path(baked.path).resolve()) if baked.path else None,
            "prompt_sha256": manifest.get("prompt", {}).get("sha256"),
            "base_model": manifest.get("base_model"),
            "framing": manifest.get("framing", {}).get("student"),
            "kl_reduction": manifest.get("kl", {}).get("reduction")}
