"""``promptbake evaluate``, ``tasks``, ``report`` and ``drift``: what a bake did."""

from __future__ import annotations

import json
from pathlib import Path

from promptbake import drift as drift_mod, files, models, tools
from promptbake.artifact import MANIFEST, load_baked
from promptbake.cli.arguments import (Help, add_teacher_model, float_list, score_line, split_list,
                                     teacher_for)
from promptbake.forgetting import check_suite
from promptbake.formatting import pm
from promptbake.framing import STUDENT_FRAMINGS
from promptbake.persona import Persona, SemanticScorer, persona_of
from promptbake.report import engine_report, report
from promptbake.tasks import TASKS, evaluate, load_task, shipped


def register(commands) -> None:
    _add_evaluate(commands)
    _add_tasks(commands)
    _add_report(commands)
    _add_drift(commands)


def _add_evaluate(commands) -> None:
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
                        "lists them); tool_use scores tool calls (all: the suite, and tool_use "
                        "on a tool bake)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--system", default=None, help="system prompt (model directories only)")
    p.add_argument("--framing", choices=STUDENT_FRAMINGS, default="default",
                   help="framing without a system prompt (model directories only)")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the baked LoRA delta")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--json", default=None, help="also write every score, item by item, here")
    add_teacher_model(p, "the prompted cells are scored")
    p.set_defaults(run=_evaluate)


TOOL_USE = "tool_use"


def _tool_use(limit: int | None, baked=None):
    """The tool-use evaluator: the bake's own tools for a tool bake, else the shipped ones."""
    made = baked.manifest.get("tools") if baked is not None else None
    specs = [tools.ToolSpec.from_dict(s) for s in made["specs"]] if made else None
    return tools.ToolUse(specs=specs, syntax=made["syntax"] if made else
                         tools.rendering.DEFAULT_SYNTAX).head(limit)


def _evaluate(args) -> int:
    baked = load_baked(args.target, strength=args.strength, model=args.model) \
        if args.target is not None and (Path(args.target) / MANIFEST).is_file() else None
    if baked is None and args.teacher_model is not None:
        raise ValueError(f"--teacher-model applies to a baked directory, and {args.target} is "
                         f"a model: drop --teacher-model")
    names = shipped() if args.tasks in (None, "all") else split_list(args.tasks)
    if args.tasks in (None, "all") and baked is not None and "tools" in baked.manifest:
        names.append(TOOL_USE)  # a tool bake: its tools' use too
    if baked is None:
        lm, tokenizer, _ = models.load(args.target)  # a plain model directory, or the default
        scores = evaluate(lm, tokenizer, [n for n in names if n != TOOL_USE],
                          system=args.system, framing=args.framing, limit=args.limit)
        if TOOL_USE in names:
            scores[TOOL_USE] = _tool_use(args.limit)(lm, tokenizer, args.system,
                                                     framing=args.framing)
        for name, result in scores.items():
            print(f"{name:<14} {score_line(result)}")
        record = {name: r.to_dict(items=True) for name, r in scores.items()}
    else:
        suite = check_suite(baked, (_tool_use(args.limit, baked) if name == TOOL_USE else
                                    load_task(name, limit=args.limit) for name in names),
                            teacher=teacher_for(args, baked))
        for matrix in suite.matrices.values():
            print(matrix.table())
            print(matrix.describe_recovery() + "\n")
        gate = suite.gate
        print(gate.table())
        print(f"forgetting gate: {'PASS' if gate.passed else 'FAIL'} ({gate.describe_rule()})")
        print(f"beyond the prompt's own effect: "
              f"{'FAIL: ' + ', '.join(suite.damaged) if suite.damaged else 'PASS'} (no task "
              f"fails the gate both against base and against base + u)")
        record = suite.to_dict()
    if args.json:
        files.write_text(Path(args.json), files.to_json(record, indent=2))
        print(f"wrote {args.json}")
    return 0


def _add_tasks(commands) -> None:
    p = commands.add_parser("tasks", help="list the shipped evaluation tasks",
                            description="List the tasks of the offline suite.")
    p.set_defaults(run=_tasks)


def _tasks(args) -> int:
    for name, task in TASKS.items():
        print(f"{name:<14} {len(task.items):>4} items  {task.kind:<16} {task.description}")
    print(f"{TOOL_USE:<14} {len(tools.ToolUse().items):>4} items  tool calls       the shipped "
          f"tools' held-out items (a tool bake: its own tools'); call accuracy, end to end")
    print("a task of your own: a .jsonl file in the same format, passed by path to --tasks")
    return 0


def _add_report(commands) -> None:
    p = commands.add_parser(
        "report", help="measure a bake and write report.md, report.json and plots",
        description="The release check of a bake: KL before and after, the half-baking curve, "
                    "the re-prompt matrix and forgetting gate on the task suite, persona drift "
                    "(prompted vs baked; adherence scored by a persona, or by a scorer derived "
                    "from the prompt), pursuit rounds if any, and a table of gates with the "
                    "command that reproduces each. Writes into the baked directory; exits 1 when "
                    "a gate fails. On an engine run (a directory with engine.json, or a "
                    "pipeline's OUT/engine): the cycle history, every cycle's held-out score "
                    "after each round (plotted), plateaus, survival and the final gates, in "
                    "engine-report.md/.json/.png.",
        formatter_class=Help)
    p.add_argument("dir", help="a baked (or pursued) directory, or an engine run")
    p.add_argument("--tasks", default="all",
                   help="comma-separated tasks or .jsonl task files, 'all', or 'none'")
    p.add_argument("--limit", type=int, default=50, help="items per task (0: all)")
    p.add_argument("--persona", default=None,
                   help="built-in persona name or persona JSON file for the drift section; "
                        "default: the built-in persona whose prompt was baked, otherwise a "
                        "scorer derived from the prompt (answers with and without it); 'none' "
                        "skips drift")
    p.add_argument("--turns", type=int, default=30, help="conversation length for drift")
    p.add_argument("--conversations", type=int, default=3, help="conversations per model")
    p.add_argument("--strength", default="0,0.25,0.5,0.75,1,1.25",
                   help="strengths of the half-baking curve")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    add_teacher_model(p, "everything \"prompted\" is measured")
    p.set_defaults(run=_report)


def _report(args) -> int:
    if (Path(args.dir) / "engine.json").is_file():
        return _engine_report(args.dir)
    tasks = None if args.tasks == "all" else [t for t in split_list(args.tasks) if t != "none"]
    persona = "" if args.persona == "none" else args.persona
    strengths = float_list(args.strength, "--strength")
    record = report(args.dir, tasks=tasks, limit=args.limit or None, persona=persona,
                    turns=args.turns, conversations=args.conversations, strengths=strengths,
                    model=args.model, teacher_model=args.teacher_model,
                    say=lambda line: print(f"... {line}", flush=True))
    print()
    for gate in record["gates"]:
        print(f"{'pass' if gate['passed'] else 'FAIL'}  {gate['target']}: {gate['measured']}")
    print(f"wrote {Path(args.dir) / 'report.md'}, report.json and report-*.png "
          f"({record['seconds']:.0f} s)")
    return 0 if all(g["passed"] for g in record["gates"]) else 1


def _add_drift(commands) -> None:
    p = commands.add_parser(
        "drift", help="persona adherence over a long conversation: prompted vs baked",
        description="Persona drift: the model holds a conversation of --turns turns (a scripted "
                    "user, or itself as the user with --user self), the history growing as in "
                    "real use, and every answer is scored for persona adherence by rules "
                    "(keywords, patterns, style) and by sentence-embedding similarity to the "
                    "persona's exemplars; for a prompt without a persona, by similarity to the "
                    "model's own answers with the prompt against those without it. Drift = mean "
                    "adherence over the first 3 turns minus adherence at the last turn. The modes "
                    "run on the same user turns, so their drifts compare pairwise. Writes "
                    "drift.json and drift.png.",
        formatter_class=Help)
    p.add_argument("dir", help="a baked directory")
    p.add_argument("--persona", default=None,
                   help="built-in persona name or persona JSON file (rules and exemplars); "
                        "default: the built-in persona whose prompt was baked, otherwise a "
                        "scorer derived from the prompt (answers with and without it)")
    p.add_argument("--modes", default="prompted,baked",
                   help="comma-separated: prompted (base + prompt), baked, base")
    p.add_argument("--turns", type=int, default=30, help="conversation length")
    p.add_argument("--conversations", type=int, default=3, help="conversations per mode")
    p.add_argument("--user", choices=drift_mod.USER_MODES, default="scripted",
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
    add_teacher_model(p, "the prompted mode runs")
    p.add_argument("--quiet", action="store_true", help="no per-turn progress")
    p.set_defaults(run=_drift)


def _drift(args) -> int:
    modes = split_list(args.modes)
    drift_mod.check_modes(modes)  # before the model loads
    persona = Persona.load(args.persona) if args.persona else None
    baked = load_baked(args.dir, strength=args.strength, model=args.model)
    # the teacher answers the prompted mode, and a persona derived from the prompt
    teacher = teacher_for(args, baked) if "prompted" in modes or persona is None else None
    if "prompted" in modes:  # before any conversation of another mode
        drift_mod.check_self_play(teacher, args.user)
    persona = persona or persona_of(baked, max_new_tokens=args.max_new_tokens, teacher=teacher)
    semantic = SemanticScorer(persona)
    print(f"adherence scorer: {persona.describe()}", flush=True)

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
            seed=args.seed, semantic=semantic, progress=progress, teacher=teacher))
    k = min(3, args.turns)
    print(f"\n{'model':<10} {'first ' + str(k) + ' turns':>16} {'turn ' + str(args.turns):>16} "
          f"{'drift':>16}")
    for mode, result in results.items():
        d = result.drift(k=k)
        print(f"{mode:<10} {pm(d['first'], d['first_se'], '.3f'):>16} "
              f"{pm(d['at_value'], d['at_value_se'], '.3f'):>16} "
              f"{pm(d['drift'], d['drift_se'], '+.3f'):>16}")
    if "baked" in results and "prompted" in results:
        diff = drift_mod.drift_difference(results["baked"], results["prompted"], k=k)
        print(f"baked minus prompted drift: {pm(diff['drift'], diff['drift_se'], '+.3f')}"
              f" ({'paired' if diff['paired'] else 'independent'} conversations)")
    out = Path(args.out) if args.out else Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {mode: r.to_dict(k=k) for mode, r in results.items()}
    files.write_text(out / "drift.json", files.to_json(record, indent=2, ensure_ascii=False))
    drift_mod.plot_drift(results, out / "drift.png")
    print(f"wrote {out / 'drift.json'} (curves and transcripts) and {out / 'drift.png'}")
    return 0


def _engine_report(directory: str) -> int:
    wrote = engine_report(directory)
    gates = json.loads((Path(directory) / "engine-report.json").read_text())["gates"]
    for gate in gates:
        print(f"{'pass' if gate['passed'] else 'FAIL'}  {gate['target']}: {gate['measured']}")
    print(f"wrote {', '.join(str(Path(directory) / w) for w in wrote)}")
    return 0 if all(g["passed"] for g in gates) else 1
