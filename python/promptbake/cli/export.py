"""``promptbake export``: merge a bake and write it for serving."""

from __future__ import annotations

import sys
from pathlib import Path

from promptbake import compress, files
from promptbake.artifact import load_baked, sources
from promptbake.cli.arguments import Help
from promptbake.export import (FORMATS, GGUF_LORA, GGUF_QUANTIZATIONS, INT4_LORA, INT4_METHODS,
                               QUANTIZATIONS)

LOW_RETENTION = 0.9  # an export that keeps less of the bake's KL reduction gets a warning


def register(commands) -> None:
    _add_export(commands)


def _add_export(commands) -> None:
    p = commands.add_parser(
        "export", help="merge a bake and export it (safetensors, ONNX with int8 / int4 / "
                       "pruning, or GGUF for llama.cpp and Ollama)",
        description="Merge the baked LoRA delta (at --strength) into the weights and write a "
                    "transformers model directory (--format safetensors), an ONNX model with a "
                    "KV cache for ONNX Runtime (--format onnx), optionally int8- or "
                    "int4-quantized and pruned (with recovery distillation from the dense model), "
                    "or one GGUF file for llama.cpp and Ollama (--format gguf, Llama-architecture "
                    "models such as SmolLM2; f32, f16, q8_0, q4_1 or q4_0; with q4_1 the "
                    "bake's LoRA is kept beside the base as a llama.cpp adapter, adapter.gguf), "
                    "with a Modelfile for `ollama create`. "
                    "Every ONNX and GGUF export is checked against torch (logits, top-1 "
                    "agreement, greedy tokens; a GGUF is read back by transformers' GGUF loader, "
                    "tokenizer included) and written only if it passes; a failed check exits "
                    "with status 1.",
        formatter_class=Help)
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--out", required=True,
                   help="output directory (for gguf: it holds model.gguf, manifest.json, an "
                        "Ollama Modelfile and, with the LoRA as an adapter, adapter.gguf)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="what to write")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the LoRA delta merged")
    p.add_argument("--quantize", choices=QUANTIZATIONS + GGUF_QUANTIZATIONS, default=None,
                   metavar="{" + ",".join(QUANTIZATIONS + GGUF_QUANTIZATIONS) + "}",
                   help="onnx: int8 weights (blockwise, with SmoothQuant on Llama-like models) "
                        "or int4 (onnxruntime's 4-bit MatMulNBits, embedding and tied head "
                        "included; see --int4-method); gguf: f32 (exact; the default), f16, "
                        "q8_0, q4_1 or q4_0 (llama.cpp's blocks of 32: 8 bits; 4 bits with a "
                        "scale and a minimum, the default model's own format, which holds its "
                        "weights exactly; 4 bits with a scale alone; both 4-bit ones keep the "
                        "embedding at q8_0)")
    p.add_argument("--int4-method", choices=INT4_METHODS, default=None,
                   help="with --quantize int4: hqq (Half-Quadratic Quantization: a step and a "
                        "float zero point per block fitted to the weights; the default; the "
                        "only one that holds the default model's own 4-bit grid, README), "
                        "hqq-int (HQQ with 4-bit integer zero points, refitted), "
                        "rtn (symmetric round to nearest, no zero points: smaller, less "
                        "accurate) or gptq (onnxruntime's GPTQ: codes chosen one input row at a "
                        "time to keep the layer's outputs on calibration prompts, 4-bit integer "
                        "zero points, int8 compute; on SmolLM2 its codes did not depend on the "
                        "calibration and it kept 28%% of the pirate bake; needs an even number of "
                        "blocks per column and under 2 GiB of fp32 weights)")
    p.add_argument("--int4-lora", choices=INT4_LORA, default=None,
                   help="with --quantize int4: beside (quantise the base weights alone and keep "
                        "the bake's LoRA beside them, computed in fp32, so 4-bit rounding cannot "
                        "erase it; "
                        "the default; with --recover-steps the LoRA and the 4-bit scales are "
                        "then trained on the 4-bit base toward the fp32 bake) or merge (quantise "
                        "the merged bake: kept 42%% of the pirate bake, against 99%%)")
    p.add_argument("--gguf-lora", choices=GGUF_LORA, default=None,
                   help="with --format gguf: adapter (the base weights in model.gguf and the "
                        "bake's LoRA beside them in adapter.gguf, f32, which llama.cpp applies "
                        "with --lora and Ollama with the Modelfile's ADAPTER: rounding cannot "
                        "erase the bake; the default for q4_1) or merge (one file with the bake "
                        "merged in, for tools without LoRA adapters; the default for the other "
                        "precisions: f32, f16 and q8_0 keep the bake merged, q4_0 merged kept "
                        "-32%% of the pirate bake)")
    p.add_argument("--int4-correction", type=int, default=None, metavar="RANK",
                   help="with --quantize int4 and the LoRA beside: a rank-RANK correction in "
                        "fp16 beside every 4-bit matrix (the MLP's and a 4-bit head's too), "
                        "started from the SVD of its rounding error and trained with "
                        "--recover-steps; costs RANK x (inputs + outputs) x 2 bytes per matrix "
                        "(default: none)")
    p.add_argument("--int4-head", type=int, choices=(4, 8), default=None, metavar="BITS",
                   help="with --quantize int4: the LM head (and a tied embedding) in 8 bits "
                        "(the default) or 4. On the default model a 4-bit head is nearly all of "
                        "the 4-bit export's error: the pirate bake kept 70%% with it, 99%% with "
                        "8 bits, for 10.6 MB more")
    p.add_argument("--int4-compute", choices=("int8", "fp32"), default=None,
                   help="with --quantize int4: onnxruntime's compute for the 4-bit matrices: "
                        "fp32 (exact with the weights; the default) or int8 (activations "
                        "quantised per block on the fly: decoding 10%% faster here, and three "
                        "bakes kept 95.5-98.6%% against 99.0-99.6%%). "
                        "The 8-bit head computes in int8 either way")
    p.add_argument("--block-size", type=int, default=None,
                   help="with --quantize int8 or int4: weights per scale (a power of 2, at "
                        "least 16; default 32). Smaller blocks are more accurate and store more "
                        "scales: int4 at 32 is 81%% smaller than fp32 with hqq and the 8-bit "
                        "head (78%% with --scale-storage fp32); with --int4-head 4 and fp32 "
                        "scales, 81%% with hqq and 84%% with rtn, at 64 84%% and 86%%. The "
                        "default model's own 4-bit grid is in blocks of 32 (README). gptq takes "
                        "only sizes that cut every layer's inputs into an even number of blocks "
                        "(SmolLM2: 16 or 32)")
    p.add_argument("--scale-storage", choices=("fp16", "fp32"), default=None,
                   help="with --quantize int8 or int4: how the numbers beside the codes are "
                        "stored (the blocks' scales, int4's zero points, the LoRA kept beside "
                        "the 4-bit base): fp16 (the default; cast to fp32 when the graph loads, "
                        "5 bits per 4-bit weight instead of 6) or fp32 (exactly as computed)")
    p.add_argument("--prune", default=None,
                   help="sparsity of the decoder's linear layers: a ratio in (0, 1) or an N:M "
                        "pattern such as 2:4. Experimental, not a serving option: on the default "
                        "model pruning loses most of the bake (README: what each setting keeps)")
    p.add_argument("--prune-method", choices=compress.METHODS, default="wanda",
                   help="wanda: |weight| x input-activation norm, calibrated on responses")
    p.add_argument("--recover-steps", type=int, default=None,
                   help="recovery distillation steps after pruning (default 60; 0: none), or of "
                        "the LoRA kept beside a 4-bit base and the 4-bit scales (--quantize "
                        "int4; default 0: with the default 8-bit head the pirate bake kept "
                        "99.6%% without, and a recovery that raises the held-out KL is dropped; "
                        "with --int4-head 4, 60 steps kept 86%% against 70%%)")
    p.add_argument("--recover-lr", type=float, default=None,
                   help="recovery learning rate (default 1e-4 after pruning, 1e-3 for the LoRA "
                        "beside a 4-bit base)")
    p.add_argument("--recover-contexts", type=int, default=None,
                   help="built-in training contexts for pruning's calibration and recovery, or "
                        "for the recovery of the LoRA beside a 4-bit base (default 48)")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_export)


def _export(args) -> int:
    # The ONNX side needs the optional onnx packages: imported when an export runs.
    from promptbake.export import (ParityError, check_gguf_lora, check_quantize, export_baked,
                                   gguf)

    check_quantize(args.format, args.quantize, args.prune)  # before the bake is loaded
    check_gguf_lora(args.format, args.quantize, args.gguf_lora)
    int8, int4 = _options(args)
    files.check_output(Path(args.out), overwrite=args.overwrite,
                       kinds=gguf.KINDS if args.format == "gguf" else files.MODEL_DIRS,
                       sources=sources(args.dir, args.model))
    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    prune = None
    if args.prune:
        given = {"recover_steps": args.recover_steps, "lr": args.recover_lr,
                 "contexts": args.recover_contexts}  # else the pruner's defaults
        prune = compress.pruner(baked, args.prune, method=args.prune_method,
                                progress=not args.quiet,
                                **{k: v for k, v in given.items() if v is not None})
    try:
        done = export_baked(baked, args.out, format=args.format, strength=args.strength,
                            quantize=args.quantize, prune=prune, overwrite=args.overwrite,
                            int8=int8, int4=int4, progress=not args.quiet,
                            gguf_lora=args.gguf_lora)
    except ParityError as err:
        print(f"promptbake: the export failed its parity check and was not written:\n{err}",
              file=sys.stderr)
        return 1
    manifest = done.manifest
    from promptbake.export.parity import summary

    if manifest.get("kind") == "gguf":
        adapter = manifest.get("adapter")
        kept = f" and {done.path / adapter['file']} (the LoRA, a llama.cpp adapter)" \
            if adapter else ""
        print(f"wrote {done.path / manifest['file']}{kept}: GGUF {manifest['precision']}, "
              f"{manifest['bytes'] / 1e6:.1f} MB")
        print(f"parity   {summary(manifest['parity'])} (read back by transformers"
              f"{', with the adapter' if adapter else ''})")
        _print_retention(manifest, "gguf")
        lora = f" --lora {done.path / adapter['file']}" if adapter else ""
        print(f"run it   llama-cli -m {done.path / manifest['file']}{lora}   or   "
              f"ollama create NAME -f {done.path / 'Modelfile'}")
        return 0
    if manifest.get("kind") != "onnx":
        print(f"wrote {done.path} (a transformers model directory, strength {args.strength:g})")
        return 0
    print(f"wrote {done.path}: {manifest['precision']}, {manifest['bytes'] / 1e6:.1f} MB")
    quantized = manifest.get(manifest["precision"], {})
    if quantized.get("fp32_bytes"):
        print(f"size     {100 * (1 - manifest['bytes'] / quantized['fp32_bytes']):.1f}% smaller "
              f"than fp32 ({quantized['fp32_bytes'] / 1e6:.1f} MB)")
    print(f"parity   {summary(manifest['parity'])}")
    _print_retention(manifest, "onnx")
    return 0


def _print_retention(manifest: dict, name: str) -> None:
    kl = manifest.get("held_out_kl")
    if kl:
        print(f"held-out KL(prompted || export) {kl[name]['per_token']:.4f} nats/token "
              f"(baked {kl['baked']['per_token']:.4f}, base {kl['base']['per_token']:.4f}); "
              f"keeps {100 * kl['retention']:.1f}% of the bake's KL reduction")
        if kl["retention"] < LOW_RETENTION:
            print(f"warning  this export keeps only {100 * kl['retention']:.0f}% of the bake: "
                  f"served as it is, it answers much as the unbaked model does. int8 without "
                  f"pruning kept 99% on the default model; README 'Serving a baked model' "
                  f"lists what each option keeps")


def _options(args):
    """(Int8Options, Int4Options) from --int4-method and --block-size, validated before any
    work; None where the defaults apply."""
    from promptbake.export import Int4Options, Int8Options

    if args.int4_method is not None and args.quantize != "int4":
        raise ValueError(f"--int4-method applies to --quantize int4, not "
                         f"{args.quantize or 'an unquantized export'}: add --quantize int4")
    if args.block_size is not None and args.quantize not in ("int8", "int4"):
        raise ValueError(f"--block-size applies to --quantize int8 or int4, not "
                         f"{args.quantize or 'an unquantized export'}")
    for flag, value in (("--int4-head", args.int4_head), ("--int4-compute", args.int4_compute)):
        if value is not None and args.quantize != "int4":
            raise ValueError(f"{flag} applies to --quantize int4, not "
                             f"{args.quantize or 'an unquantized export'}: add --quantize int4")
    if args.scale_storage is not None and args.quantize not in ("int8", "int4"):
        raise ValueError(f"--scale-storage applies to --quantize int8 or int4, not "
                         f"{args.quantize or 'an unquantized export'}")
    if args.int4_lora is not None and args.quantize != "int4":
        raise ValueError(f"--int4-lora applies to --quantize int4, not "
                         f"{args.quantize or 'an unquantized export'}: add --quantize int4")
    # int4 keeps the bake's LoRA beside the 4-bit base unless told to merge (or pruning)
    beside = args.quantize == "int4" and args.int4_lora != "merge" and not args.prune
    if (args.recover_steps is not None or args.recover_lr is not None or
            args.recover_contexts is not None) and not args.prune and not beside:
        raise ValueError("--recover-steps, --recover-lr and --recover-contexts apply to --prune, "
                         "or to --quantize int4 with the LoRA beside (its default)")
    if args.int4_correction is not None and not beside:
        raise ValueError("--int4-correction puts a correction beside the 4-bit base: add "
                         "--quantize int4, without --int4-lora merge")
    if args.int4_lora == "beside" and args.prune:
        raise ValueError("--int4-lora beside and --prune: pruning works on the merged weights; "
                         "choose one")
    if beside and not args.recover_steps and (args.recover_lr is not None or
                                              args.recover_contexts is not None):
        raise ValueError("--recover-lr and --recover-contexts set the recovery of the LoRA "
                         "beside the 4-bit base, which runs with --recover-steps N (N > 0)")
    if args.recover_contexts is not None and args.recover_contexts < 1:
        raise ValueError(f"--recover-contexts {args.recover_contexts}: give at least 1")
    size = {} if args.block_size is None else {"block_size": args.block_size}
    if args.scale_storage is not None:
        size["scale_storage"] = args.scale_storage
    if args.quantize == "int4":
        chosen = {"method": args.int4_method, "lora": args.int4_lora, "head_bits": args.int4_head,
                  "accuracy_level": {"int8": 4, "fp32": 1, None: None}[args.int4_compute]}
        if beside:
            chosen.update(recover_steps=args.recover_steps, recover_lr=args.recover_lr,
                          recover_contexts=args.recover_contexts,
                          correction_rank=args.int4_correction)
        options = Int4Options(**size, **{k: v for k, v in chosen.items() if v is not None})
        options.validate()
        return None, options
    if args.quantize == "int8" and size:
        options = Int8Options(**size)
        options.validate()
        return options, None
    return None, None
