"""``promptbake export``: merge a bake and write it for serving."""

from __future__ import annotations

import sys
from pathlib import Path

from promptbake import compress, files
from promptbake.artifact import load_baked, sources
from promptbake.cli.arguments import Help
from promptbake.export import FORMATS, QUANTIZATIONS


def register(commands) -> None:
    _add_export(commands)


def _add_export(commands) -> None:
    p = commands.add_parser(
        "export", help="merge a bake and export it (safetensors, or ONNX with int8 / pruning)",
        description="Merge the baked LoRA delta (at --strength) into the weights and write a "
                    "transformers model directory (--format safetensors) or an ONNX model with a "
                    "KV cache for ONNX Runtime (--format onnx), optionally int8-quantized and "
                    "pruned (with recovery distillation from the dense model). Every ONNX export "
                    "is checked against torch (logits, greedy tokens) and written only if it "
                    "passes; a failed check exits with status 1.",
        formatter_class=Help)
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="what to write")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the LoRA delta merged")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="int8 weights (blockwise, with SmoothQuant on Llama-like models)")
    p.add_argument("--prune", default=None,
                   help="sparsity of the decoder's linear layers: a ratio in (0, 1) or an N:M "
                        "pattern such as 2:4")
    p.add_argument("--prune-method", choices=compress.METHODS, default="wanda",
                   help="wanda: |weight| x input-activation norm, calibrated on responses")
    p.add_argument("--recover-steps", type=int, default=60,
                   help="recovery distillation steps after pruning (0: none)")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate")
    p.add_argument("--recover-contexts", type=int, default=48,
                   help="training contexts for calibration and recovery")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_export)


def _export(args) -> int:
    # The ONNX side needs the optional onnx packages: imported when an export runs.
    from promptbake.export import ParityError, export_baked

    files.check_output(Path(args.out), overwrite=args.overwrite,
                       sources=sources(args.dir, args.model))
    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    prune = None
    if args.prune:
        prune = compress.pruner(baked, args.prune, method=args.prune_method,
                                recover_steps=args.recover_steps, lr=args.recover_lr,
                                contexts=args.recover_contexts, progress=not args.quiet)
    if args.format == "safetensors" and (args.quantize or args.prune):
        raise ValueError("--quantize and --prune apply to --format onnx")
    try:
        done = export_baked(baked, args.out, format=args.format, strength=args.strength,
                            quantize=args.quantize, prune=prune, overwrite=args.overwrite)
    except ParityError as err:
        print(f"promptbake: the export failed its parity check and was not written:\n{err}",
              file=sys.stderr)
        return 1
    manifest = done.manifest
    if manifest.get("kind") != "onnx":
        print(f"wrote {done.path} (a transformers model directory, strength {args.strength:g})")
        return 0
    from promptbake.export.parity import summary

    print(f"wrote {done.path}: {manifest['precision']}, {manifest['bytes'] / 1e6:.1f} MB")
    print(f"parity   {summary(manifest['parity'])}")
    kl = manifest.get("held_out_kl")
    if kl:
        print(f"held-out KL(prompted || export) {kl['onnx']['per_token']:.4f} nats/token "
              f"(baked {kl['baked']['per_token']:.4f}, base {kl['base']['per_token']:.4f}); "
              f"keeps {100 * kl['retention']:.1f}% of the bake's KL reduction")
    return 0
