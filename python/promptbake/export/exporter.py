"""Exporting a (baked, merged, possibly pruned) model to ONNX, checked before it is presented.

``export_onnx`` writes into a temporary directory: the graph (``graph.trace``), int8 or int4
weights (``smooth.smoothed``, then ``quantize.int8`` or ``quantize.int4``) and packed pruned
weights (``sparse.pack``) if asked, ``onnx.checker``, the parity check against torch
(``parity.check``), the tokenizer and ``manifest.json``. Only then is the directory renamed to
its name; a failed check raises ``ParityError`` and leaves nothing
behind (an earlier export at that path is kept as it was).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from promptbake import contexts, files, modeling, models, versions
from promptbake.artifact import MANIFEST, Baked, load_baked, source_record, sources
from promptbake.decoding import stop_token_ids
from promptbake.export import (FORMATS, GGUF_LORA, GGUF_QUANTIZATIONS, QUANTIZATIONS, branches,
                               gguf, graph, merging as merge_mod, parity, quantize as quantize_mod,
                               smooth, sparse as packing)
from promptbake.export.beside import Beside
from promptbake.export.runtime import OnnxLM

log = logging.getLogger("promptbake")

ParityError = parity.ParityError
QUANTIZE = (None, *QUANTIZATIONS)


@dataclasses.dataclass
class Export:
    """An export directory and its manifest."""

    path: Path
    manifest: dict

    def load(self, providers=None) -> OnnxLM:
        if self.manifest.get("kind") != "onnx":
            raise ValueError(f"{self.path} is a safetensors model directory: load it with "
                             f"transformers.AutoModelForCausalLM.from_pretrained")
        return OnnxLM(self.path, providers=providers)


def model_bytes(path: Path) -> int:
    """Bytes on disk of the graph and its weights (``model.onnx`` and any ``.data`` beside it)."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.glob("model.onnx*") if p.is_file())


def _check_model(model) -> None:
    graph.check_supported(model)
    weights = list(model.parameters())
    if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
        raise ValueError("export_onnx needs an fp32 model on the CPU: pass model.float().cpu()")


def _input_rows(model) -> dict[str, int]:
    """Input rows of each weight the graph multiplies by (a Linear's in_features; GPT-2's Conv1D
    stores its weight [in, out]), by module name."""
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            rows[name] = module.in_features
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            rows[name] = int(module.weight.shape[0])
    return rows


def export_onnx(model, tokenizer, out_dir: str | Path, *, quantize: str | None = None,
                sparse: bool = False, int8: quantize_mod.Int8Options | None = None,
                int4: quantize_mod.Int4Options | None = None, parity_contexts=None,
                framing=None, baked=None,
                tolerances: parity.Tolerances | None = None, overwrite: bool = False,
                source: dict | None = None, source_dirs: tuple = (),
                beside: Beside | None = None) -> Export:
    """Exports ``model`` (a transformers causal LM, fp32 on CPU) to ``out_dir`` with a KV cache.

    Args:
        quantize: None (fp32), "int8" or "int4" (8- or 4-bit weights, see ``quantize.py``).
        sparse: store weights with enough pruned elements (a pruned model's) packed: a bitmask
            and the kept values, expanded by the graph at session creation (see ``sparse.py``).
        int8, int4: how to quantise (method, block size, exclusions; ``quantize.Int8Options``,
            ``quantize.Int4Options``).
        parity_contexts: contexts (user messages or message lists) or token-id lists for the
            parity check; None: the first ``tolerances.contexts`` built-in held-out contexts.
        framing: the bake's ``Framing``, so contexts are templated as the baked model sees them.
        baked: the bake the model was merged from; with it, the manifest also records the
            export's held-out KL to the prompted model and the share of the bake's KL reduction
            it retains (``parity.held_out_kl``).
        source: recorded in the manifest (what the model is).
        overwrite: replace an earlier export at ``out_dir`` that holds nothing else
            (``files.check_output``); ``source_dirs`` (and the bake's directory) may not be,
            hold or contain ``out_dir``.
        beside: for ``Int4Options(lora="beside")`` (``export_baked`` makes it): the base model
            is traced and quantised, and the bake's LoRA added beside it; ``model``, the merged
            bake, stays the reference of the parity check.

    Raises ``UnsupportedArchitecture`` (a ValueError) before writing anything, and
    ``ParityError`` when the export does not match torch (nothing is left at ``out_dir``).
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: choose None (fp32), 'int8' or 'int4'")
    _check_model(model)
    options = (int4 or quantize_mod.Int4Options()) if quantize == "int4" else \
        (int8 or quantize_mod.Int8Options())
    options.validate()
    if (getattr(options, "lora", "merge") == "beside") != (beside is not None):
        raise ValueError("Int4Options(lora='beside') keeps a bake's LoRA beside its 4-bit base: "
                         "export the bake with export_baked (promptbake export BAKE_DIR "
                         "--quantize int4 --int4-lora beside)")
    if quantize == "int4" and options.method == "gptq":  # before the trace, not after it
        problem = quantize_mod.gptq_problem(
            _input_rows(model), options.block_size,
            sum(4 * w.numel() for w in model.parameters()))
        if problem:
            raise ValueError(problem)
    if beside is not None and options.smooth:
        raise ValueError("lora='beside' with SmoothQuant: smoothing rescales the base weights "
                         "the LoRA was trained on; leave smooth unset")
    out = Path(out_dir)
    protected = tuple(source_dirs or ()) + (sources(baked) if baked is not None else ())
    files.check_output(out, overwrite=overwrite, sources=protected)
    tolerances = tolerances or parity.Tolerances()
    if parity_contexts is None:
        prompts = parity.default_prompts(tokenizer, framing, tolerances.contexts)
    elif parity_contexts and all(isinstance(c, (list, tuple)) and c and isinstance(c[0], int)
                                 for c in parity_contexts):
        prompts = [list(c) for c in parity_contexts]
    else:
        prompts = parity.framed(tokenizer, parity_contexts, framing)
    top1 = tolerances.int4_top1 if quantize == "int4" else tolerances.int8_top1
    seconds: dict[str, float] = {}
    result: dict = {}

    def timed(phase: str, work: Callable):
        start = time.perf_counter()
        value = work()
        seconds[phase] = round(time.perf_counter() - start, 2)
        return value

    def write(tmp: Path) -> None:
        target = tmp / "model.onnx"
        details: dict = {}
        if quantize is None:
            timed("trace", lambda: graph.trace(model, target))
        else:
            scratch = tmp / ".fp32"
            scratch.mkdir()
            traced = timed("smooth", lambda: _smoothed(model, tokenizer, framing, options))
            traced = beside.base if beside is not None else traced or model
            timed("trace", lambda: graph.trace(traced, scratch / "model.onnx"))
            del traced
            if beside is not None:
                beside.base = None  # traced: a whole model's memory back before recovery
            if quantize == "int8":
                run = functools.partial(quantize_mod.int8, options=options)
            else:
                calibration = _calibration(tokenizer, framing, options) \
                    if options.method == "gptq" else None
                run = functools.partial(quantize_mod.int4, options=options,
                                        calibration=calibration)
            details[quantize] = {**options.to_dict(), **timed(
                "quantize", lambda: run(scratch / "model.onnx", target))}
            details[quantize]["fp32_bytes"] = model_bytes(scratch)
            shutil.rmtree(scratch)
            if beside is not None:
                details[quantize]["beside"] = timed("lora", lambda: beside.attach(target, model))
            half, fuse = options.scale_storage == "fp16", quantize == "int4"
            if half or fuse:
                done = timed("finish", lambda: _finish(target, half=half, fuse=fuse))
                if half:
                    details[quantize]["fp16_storage"] = done["fp16_storage"]
                    if "weight_bytes" in details[quantize]:  # int4's: as stored now
                        details[quantize]["weight_bytes"] = done["weight_bytes"]
                if fuse:
                    details[quantize]["fused_side_terms"] = done["fused_side_terms"]
        if sparse:
            details["sparse"] = timed("pack", lambda: _pack(target))
        timed("check", lambda: _checker(target))
        # torch and onnxruntime take turns in the parity check: the same number of threads.
        lm = OnnxLM(tmp, threads=torch.get_num_threads())
        report = timed("parity", lambda: parity.check(model, lm, prompts,
                                                      quantized=quantize is not None,
                                                      tolerances=tolerances, top1_floor=top1))
        manifest = _manifest(model, tokenizer, tmp, quantize, details, report, tolerances,
                             source)
        if not report["passed"]:
            raise ParityError(f"the export to {out} does not match the torch model: "
                              f"{parity.summary(report)}; criterion: {report['criterion']}. "
                              f"Nothing was written (an earlier export there is unchanged)", report)
        if baked is not None:
            manifest["held_out_kl"] = timed("held_out_kl", lambda: parity.kl_record(lm, baked))
        manifest["wall_seconds"] = dict(seconds)
        _consumer_files(model, tokenizer, tmp)
        (tmp / "manifest.json").write_text(files.to_json(manifest, indent=2))
        result["manifest"] = manifest

    _remove_stale(out)
    files.replace_dir(out, write, kind="onnx")
    manifest = result["manifest"]
    log.info("exported %s to %s (%s, %.1f MB): %s", model.config.model_type, out,
             manifest["precision"], manifest["bytes"] / 1e6, parity.summary(manifest["parity"]))
    return Export(out, manifest)


def _consumer_files(model, tokenizer, tmp: Path) -> None:
    """What generic consumers read beside the graph: the tokenizer, the model's
    ``config.json`` and ``generation_config.json`` (Optimum's ``ORTModelForCausalLM`` reads the
    cache layout from the config; the graph always takes a KV cache, so ``use_cache`` is true),
    both readable by transformers 4 too (``models.make_portable``), and ``genai_config.json``
    for onnxruntime-genai (``og.Model(out)``) on the architectures it is tested on."""
    tokenizer.save_pretrained(tmp)
    inner = modeling.inner(model)
    config = copy.deepcopy(inner.config)
    config.use_cache = True
    config.save_pretrained(tmp)
    if getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(tmp)
    models.make_portable(tmp)
    genai = graph.genai_config(config, tokenizer)
    if genai is not None:
        (tmp / "genai_config.json").write_text(files.to_json(genai, indent=2))


def _smoothed(model, tokenizer, framing,
              options: quantize_mod.Int8Options | quantize_mod.Int4Options):
    """The model with SmoothQuant's scales folded in (a copy), calibrated on built-in training
    contexts (never the held-out ones the export is measured on); None without smoothing."""
    if options.smooth is None:
        return None
    return smooth.smoothed(model, _calibration(tokenizer, framing, options), options.smooth)


def _calibration(tokenizer, framing,
                 options: quantize_mod.Int8Options | quantize_mod.Int4Options) -> list[list[int]]:
    """``options.calibration`` built-in training contexts, framed as the bake's prompts are:
    what SmoothQuant's ranges and GPTQ's Hessians are measured on (never the held-out contexts
    the export is measured on)."""
    return parity.framed(tokenizer, contexts.builtin("train")[:options.calibration], framing)


def _finish(path: Path, *, half: bool, fuse: bool) -> dict:
    """The last rewrites of a quantised graph at ``path``, in one load and save: with ``half``
    ``quantize.store_half`` (its record as ``fp16_storage``, and the weights' bytes by kind as
    now stored, ``weight_bytes``), with ``fuse`` ``branches.fuse`` (``fused_side_terms``)."""
    import onnx

    model = onnx.load(str(path))
    done = {}
    if half:
        done["fp16_storage"] = quantize_mod.store_half(model)
        done["weight_bytes"] = quantize_mod.weight_bytes(model)
    if fuse:
        done["fused_side_terms"] = branches.fuse(model)
    graph.save(model, path)
    return done


def _remove_stale(out: Path) -> None:
    """Removes what a killed export to ``out`` left: ``.NAME.tmp-PID`` / ``.NAME.old-PID``
    directories (``files.replace_dir``) whose process is gone."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = leftover.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _checker(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))  # the path form also works past 2 GB


def _pack(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path))
    records = packing.pack(model)
    if not records:
        log.warning("sparse export: no weight has enough zeros to pack (is the model pruned?)")
    graph.save(model, path)
    elements = sum(int(np.prod(r["shape"])) for r in records)
    return {"packed_weights": len(records),
            "dense_bytes": sum(r["dense_bytes"] for r in records),
            "packed_bytes": sum(r["packed_bytes"] for r in records),
            "sparsity": 1 - sum(r["kept"] for r in records) / max(1, elements),
            "weights": records}


def _manifest(model, tokenizer, tmp: Path, quantize, details, report, tolerances,
              source) -> dict:
    layers, kv_heads, head_dim = graph.cache_layout(model.config)
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.glob("model.onnx*"))}
    return {
        "format": 1, "kind": "onnx", "promptbake": versions.promptbake_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "precision": quantize or "fp32", "files": sizes, "bytes": sum(sizes.values()),
        "architecture": {"model_type": model.config.model_type, "layers": layers,
                         "kv_heads": kv_heads, "head_dim": head_dim,
                         "vocab": model.config.vocab_size, "tied_head": graph.tied(model),
                         "max_positions": getattr(model.config, "max_position_embeddings", None),
                         "opset": graph.OPSET},
        "inputs": list(graph.INPUTS) + ["past_key_values.{i}.key", "past_key_values.{i}.value"],
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
        "eos_token_ids": sorted(stop_token_ids(tokenizer, model)),
        "pad_token_id": tokenizer.pad_token_id,
        **details,
        "parity": report, "tolerances": dataclasses.asdict(tolerances),
        "source": source,
        "versions": versions.libraries("torch", "transformers", "onnx", "onnxruntime"),
    }


def export_baked(baked, out: str | Path, *, format: str = "onnx", strength: float = 1.0,
                 quantize: str | None = None, prune: Callable | None = None,
                 sparse: bool | None = None, overwrite: bool = False,
                 int8: quantize_mod.Int8Options | None = None,
                 int4: quantize_mod.Int4Options | None = None,
                 tolerances: parity.Tolerances | None = None,
                 progress: bool = False, gguf_lora: str | None = None
                 ) -> Export | gguf.GgufExport:
    """What ``promptbake export DIR`` does: merge the bake at ``strength`` and write it as a
    safetensors model directory, an ONNX export or a GGUF file.

    ``baked``: a ``Baked`` or a bake's directory. ``quantize``: the ONNX export's "int8" or
    "int4" (options in ``int8`` / ``int4``), or the GGUF export's "f32", "f16", "q8_0", "q4_1"
    or "q4_0"; ``gguf_lora``: "merge" the bake into the GGUF, or keep it beside the base as a
    llama.cpp LoRA "adapter" (``adapter.gguf``; the default for q4_1, where 4-bit rounding of
    the merged weights would erase most of the bake). ``prune``: called with the merged model
    before the ONNX export (e.g. ``lambda m: compress.prune(m, 0.5)``); what it returns is
    recorded when it has ``to_dict()``; the pruned weights are then stored packed unless
    ``sparse=False``. ``int4=Int4Options(lora="beside", recover_steps=N)`` quantises the base
    and keeps the LoRA beside it, recovered for N steps (``beside.py``); ``progress``: a bar
    for that recovery.
    """
    check_quantize(format, quantize, prune)
    gguf_lora = check_gguf_lora(format, quantize, gguf_lora)
    if quantize == "int4" and (int4 is None or int4.lora is None):  # a bake's int4 keeps its
        # LoRA beside the 4-bit base unless pruning works on the merged weights
        int4 = dataclasses.replace(int4 or quantize_mod.Int4Options(),
                                   lora="merge" if prune is not None else "beside")
    if int4 is not None and int4.lora == "beside" and (quantize != "int4" or prune is not None):
        raise ValueError("Int4Options(lora='beside') applies to quantize='int4' without pruning "
                         "(pruning works on the merged weights)")
    if format == "safetensors":
        path = merge_mod.save_merged(baked, out, strength, overwrite=overwrite)
        return Export(path, json.loads((path / MANIFEST).read_text()))
    files.check_output(Path(out), overwrite=overwrite,  # before the minutes of work below
                        kinds=gguf.KINDS if format == "gguf" else files.MODEL_DIRS,
                        sources=sources(baked))
    if not isinstance(baked, Baked):
        baked = load_baked(baked, strength=strength)
    source = {**source_record(baked), "strength": float(strength)}
    model = merge_mod.merge(baked, strength)
    saved = baked.strength
    baked.strength = strength  # held_out_kl compares with the bake at this strength
    try:
        if format == "gguf":
            adapter = gguf.Adapter(merge_mod.merge(baked, 0.0),
                                   merge_mod.lora_factors(baked.model, float(strength))) \
                if gguf_lora == "adapter" else None
            return gguf.export_gguf(model, baked.tokenizer, out, quantize=quantize,
                                    framing=baked.framing, overwrite=overwrite, source=source,
                                    name=Path(baked.path).name if baked.path else None,
                                    tolerances=tolerances, source_dirs=sources(baked),
                                    baked=baked, adapter=adapter)
        if prune is not None:
            report = prune(model)
            source["pruning"] = report.to_dict() if hasattr(report, "to_dict") else None
        if sparse is None:
            sparse = prune is not None
        beside = None
        if quantize == "int4" and int4 is not None and int4.lora == "beside":
            int4.validate()
            beside = Beside(merge_mod.merge(baked, 0.0), baked, float(strength),
                            int4.recover_steps, int4.recover_lr, int4.recover_scales,
                            int4.recover_contexts, int4.correction_rank, progress=progress)
        return export_onnx(model, baked.tokenizer, out, quantize=quantize, sparse=sparse,
                           int8=int8, int4=int4, framing=baked.framing, baked=baked,
                           tolerances=tolerances, overwrite=overwrite, source=source,
                           beside=beside)
    finally:
        baked.strength = saved


def check_quantize(format: str, quantize: str | None, prune=None) -> None:
    """Raises a ValueError for an unknown ``format``, or a quantization (or pruning) it does not
    have, naming the format that has it, or one the installed onnxruntime cannot run; checked
    before any work."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    if format == "safetensors" and (quantize or prune):
        raise ValueError("--quantize and --prune apply to the ONNX and GGUF exports: use "
                         "--format onnx or --format gguf")
    if format == "gguf" and prune:
        raise ValueError("--prune applies to the ONNX export: use --format onnx")
    if format == "safetensors":
        return
    accepted = GGUF_QUANTIZATIONS if format == "gguf" else QUANTIZATIONS
    if format == "onnx" and quantize in ("int8", "int4"):
        quantize_mod.require_matmul_nbits(int(quantize[3:]))
    if quantize is None or quantize in accepted:
        return
    other = "gguf" if quantize in GGUF_QUANTIZATIONS else "onnx" if quantize in QUANTIZATIONS \
        else None
    hint = f"; {quantize} is the {other.upper()} export's: use --format {other}" if other else ""
    if quantize in ("int4", "q4_1", "q4_0"):  # the other format's 4-bit precision
        hint += f" (4 bits in the {format.upper()} export: --quantize " \
                f"{'q4_1, which keeps the bake beside the base' if format == 'gguf' else 'int4'})"
    raise ValueError(f"--quantize {quantize} does not apply to --format {format}, which takes "
                     f"{', '.join(accepted)}{hint}")


def check_gguf_lora(format: str, quantize: str | None, lora: str | None) -> str | None:
    """The GGUF export's ``lora`` for ``quantize`` ("adapter" by default for q4_1, else
    "merge": q4_0 exported merged before the adapter existed, and on the default model it loses
    the base either way); a ValueError for an unknown value, or one given to another format."""
    if lora is not None and format != "gguf":
        raise ValueError(f"--gguf-lora applies to --format gguf, not --format {format}")
    if format != "gguf":
        return None
    if lora is None:
        return "adapter" if quantize == "q4_1" else "merge"
    if lora not in GGUF_LORA:
        raise ValueError(f"gguf_lora={lora!r}: choose one of {', '.join(GGUF_LORA)}")
    return lora


def export_model(model_dir: str | Path, out: str | Path, *, quantize: str | None = None,
                 sparse: bool = False, overwrite: bool = False,
                 int8: quantize_mod.Int8Options | None = None,
                 int4: quantize_mod.Int4Options | None = None,
                 tolerances: parity.Tolerances | None = None) -> Export:
    """Exports a plain transformers model directory (a merged or pruned model, or any local
    causal LM) to ONNX; ``models.ModelError`` names what is missing from it."""
    files.check_output(Path(out), overwrite=overwrite, sources=(model_dir,))
    model, tokenizer, path = models.load(model_dir)
    return export_onnx(model, tokenizer, out, quantize=quantize, sparse=sparse,
                       int8=int8, int4=int4, tolerances=tolerances, overwrite=overwrite,
                       source={"model": str(Path(path).resolve())}, source_dirs=(path,))
