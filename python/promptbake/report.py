"""One report of what a bake did: every line a measurement, with the command that reproduces it.

``promptbake report DIR`` writes ``report.md``, ``report.json`` and ``report-*.png`` into the
baked directory: the KL before and after, the half-baking curve (MC-KL against strength alpha,
and against the snapshot step when there are snapshots), the re-prompt matrix of every task,
the task scores and the forgetting gate, persona drift over a long conversation (prompted against
baked) when a persona is given or recognised, the rounds of prompt pursuit when the directory
holds them, and a table of gates: each target, the measured value, pass or fail, and the command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from promptbake import _files, _lm, eval as eval_mod, forgetting as fg, reprompt
from promptbake import pursuit as pursuit_mod

log = logging.getLogger("promptbake")

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MIN_REDUCTION = 0.90  # the bake's own target (issue 3)


@dataclasses.dataclass
class Gate:
    target: str
    measured: str
    passed: bool
    command: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def report(path: str | Path, *, tasks: list[str] | None = None, limit: int | None = 50,
           persona: str | Path | None = None, turns: int = 30, conversations: int = 3,
           strengths=STRENGTHS, model: str | Path | None = None, drift_tokens: int = 48,
           say: Callable[[str], None] | None = None) -> dict:
    """Measures a baked directory and writes its report there; returns the report's record.

    Args:
        tasks: task names or .jsonl files (default: the shipped suite); [] skips the tasks.
        limit: items per task (None: every item; the default keeps a report to minutes).
        persona: a built-in persona name or a persona JSON file for the drift section; default:
            the built-in persona whose prompt is the baked prompt, if any; "" skips drift.
        say: called with a line before each section (the CLI prints it).
    """
    from promptbake.bake import load_baked
    from promptbake.tasks import load_task, shipped

    say = say or log.info
    path = Path(path)
    baked = load_baked(path, model=model)
    command = _command(path, tasks, limit, persona, turns, conversations, strengths)
    record: dict = {"directory": str(path.resolve()), "prompt": baked.prompt,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": command, "manifest_kl": baked.manifest["kl"]}
    gates: list[Gate] = []
    wrote: list[str] = ["report.md", "report.json"]
    clock = time.perf_counter()

    kl = baked.manifest["kl"]
    if kl.get("reduction") is not None:
        gates.append(Gate(f"held-out KL reduction >= {MIN_REDUCTION:.0%}",
                          _pct(kl["reduction"], kl.get("reduction_se")),
                          kl["reduction"] >= MIN_REDUCTION, f"promptbake kl {path}"))

    say("half-baking curve: MC-KL at each strength")
    found = eval_mod.mc_kl(baked, strengths=strengths)
    base = found.pop("base")
    points = {float(a): k for a, k in found.items()}
    record["strength"] = {"base": base.to_dict(),
                          "points": {f"{a:g}": k.to_dict() for a, k in points.items()},
                          "reduction": {f"{a:g}": eval_mod.reduction(base, k)[0]
                                        for a, k in points.items()}}
    eval_mod.plot_curve(points, path / "report-strength.png", "strength alpha (LoRA delta scale)",
                        "Half-baking: KL to the prompted model", reference=base)
    wrote.append("report-strength.png")
    snapshots = _lm.snapshot_steps(path)
    if snapshots:
        say(f"baking progress: MC-KL at {len(snapshots)} snapshots")
        steps = eval_mod.snapshot_curve(baked, [d for _, d in snapshots])
        record["snapshots"] = {str(s): k.to_dict() for s, k in steps.items()}
        eval_mod.plot_curve({float(s): k for s, k in steps.items()},
                            path / "report-snapshots.png", "optimizer step",
                            "Baking progress: KL to the prompted model", reference=base)
        wrote.append("report-snapshots.png")

    names = shipped() if tasks is None else list(tasks)
    if names:
        matrices = {}
        for name in names:
            say(f"task {name}: base, base + u, baked, baked + u")
            evaluator = load_task(name, limit=limit)
            matrices[evaluator.name] = reprompt.reprompt_matrix(baked, evaluator)
        gate = fg.compare({n: m.cells["base"] for n, m in matrices.items()},
                          {n: m.cells["baked"] for n, m in matrices.items()})
        record["reprompt"] = {n: m.to_dict() for n, m in matrices.items()}
        record["forgetting"] = gate.to_dict()
        fg.plot_heatmap({_short(baked.prompt): gate}, path / "report-forgetting.png")
        wrote.append("report-forgetting.png")
        worst = gate.worst
        gates.append(Gate(f"forgetting: {gate.describe_rule()}",
                          "no task dropped" if worst is None or worst.relative >= 0 else
                          f"worst {worst.task} {100 * worst.relative:+.1f}% (p = "
                          f"{worst.p_value:.2g})", gate.passed,
                          f"promptbake evaluate {path} --tasks {','.join(matrices)}"
                          + (f" --limit {limit}" if limit else "")))
        # Against the prompted model too: what fails both was done by baking (beyond_prompt).
        def cell(name):
            return {task: m.cells[name] for task, m in matrices.items()}
        beyond, damaged = fg.beyond_prompt(cell("base"), cell("base+u"), cell("baked"))
        record["forgetting_vs_prompted"] = {**beyond.to_dict(), "damaged": damaged,
                                            "passed": not damaged}
        gates.append(Gate("forgetting beyond the prompt's own effect: no task fails the gate "
                          "both against base and against base + u",
                          "none" if not damaged else "; ".join(
                              f"{n} {100 * beyond.changes[n].relative:+.1f}% against base + u "
                              f"(p = {beyond.changes[n].p_value:.2g})" for n in damaged),
                          not damaged, command))

    chosen = _persona(baked, persona)
    if chosen is not None:
        from promptbake import drift as drift_mod

        say(f"persona drift over {turns} turns: prompted, then baked")
        options = dict(turns=turns, conversations=conversations, max_new_tokens=drift_tokens,
                       framing=baked.framing.student)
        semantic = drift_mod.SemanticScorer(chosen)
        with _lm.adapter(baked.model, enabled=False):
            prompted = drift_mod.drift(baked.model, baked.tokenizer, chosen, system=baked.prompt,
                                       semantic=semantic, **options)
        with _lm.adapter(baked.model, enabled=True, strength=baked.strength):
            baked_run = drift_mod.drift(baked.model, baked.tokenizer, chosen, system=None,
                                        semantic=semantic, **options)
        k = min(3, turns)  # drift = adherence over the first k turns minus at turn N
        difference = drift_mod.drift_difference(baked_run, prompted, k=k)
        record["drift"] = {"persona": chosen.name, "prompted": prompted.to_dict(k=k),
                           "baked": baked_run.to_dict(k=k), "baked_minus_prompted": difference}
        drift_mod.plot_drift({"prompted (base + u)": prompted, "baked (no prompt)": baked_run},
                             path / "report-drift.png")
        wrote.append("report-drift.png")
        b, p = baked_run.drift(k=k), prompted.drift(k=k)
        gates.append(Gate(f"persona drift at turn {turns}: baked no worse than prompted",
                          f"baked {b['drift']:+.3f}, prompted {p['drift']:+.3f} "
                          f"(difference {_pm(difference['drift'], difference['drift_se'])})",
                          b["drift"] <= p["drift"],
                          f"promptbake report {path} --persona {persona or chosen.name} "
                          f"--turns {turns} --conversations {conversations}"))

    pursuit_file = path / "pursuit.json"
    if pursuit_file.is_file():
        say("prompt pursuit rounds")
        rounds = json.loads(pursuit_file.read_text())
        record["pursuit"] = rounds
        _plot_pursuit(rounds, path / "report-pursuit.png")
        wrote.append("report-pursuit.png")
        metrics = [r["metric"] for r in rounds["rounds"]]
        stopped_at = rounds["rounds"][-1]["round"]
        gates.append(Gate("pursuit improves on one bake, or stops within 2 rounds of its plateau",
                          f"round 0 {metrics[0]:.4f} -> best {max(metrics):.4f} (round "
                          f"{rounds['best_round']}); stopped at round {stopped_at} "
                          f"({rounds['stopped']})",
                          pursuit_mod.meets_target(metrics, len(metrics) - 1,
                                                   rounds["threshold"]),
                          "promptbake pursue BAKED --out " + str(path)))

    record["gates"] = [g.to_dict() for g in gates]
    record["seconds"] = round(time.perf_counter() - clock, 1)
    _files.write_text(path / "report.json", _files.to_json(record, indent=2))
    _files.write_text(path / "report.md", _markdown(record, gates, wrote))
    _record_files(path, wrote)
    return record


def _persona(baked, persona):
    from promptbake import drift as drift_mod

    if persona == "":
        return None
    if persona is not None:
        return drift_mod.Persona.load(persona)
    for name in drift_mod.builtin_personas():
        candidate = drift_mod.Persona.load(name)
        if candidate.prompt.strip() == baked.prompt.strip():
            return candidate
    return None


def _plot_pursuit(rounds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds["rounds"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    kl = [r["kl_to_prompted"] for r in rounds["rounds"]]
    axes[0].errorbar(xs, [k["per_token"] for k in kl], yerr=[k["per_token_se"] or 0 for k in kl],
                     marker="o", capsize=3)
    axes[0].set(xlabel="round", ylabel="KL(base + u || model), nats/token",
                title="Distance to the prompted base model")
    scores = [r["score"] for r in rounds["rounds"]]
    if all(s is not None for s in scores):
        axes[1].errorbar(xs, [s["value"] for s in scores], yerr=[s["se"] or 0 for s in scores],
                         marker="o", capsize=3)
        axes[1].set(xlabel="round", ylabel=scores[0]["metric"], title=scores[0]["task"])
    else:
        axes[1].plot(xs, [r["metric"] for r in rounds["rounds"]], marker="o")
        axes[1].set(xlabel="round", ylabel=rounds["tracked"], title="tracked metric")
    fig.tight_layout()
    _files.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _relative(change: dict) -> str:
    return "—" if change["relative"] is None else f"{100 * change['relative']:+.1f}%"


def _markdown(record: dict, gates: list[Gate], wrote: list[str]) -> str:
    kl = record["manifest_kl"]
    lines = [f"# Bake report: {record['directory']}", "",
             f"Prompt: {record['prompt']!r}", "",
             f"Made by `{record['command']}` on {record['created']} ({record['seconds']:.0f} s).",
             "", "## Gates", "", "| target | measured | result | reproduce |", "|---|---|---|---|"]
    for g in gates:
        lines.append(f"| {g.target} | {g.measured} | {'pass' if g.passed else 'FAIL'} | "
                     f"`{g.command}` |")
    before, after = kl["before"], kl["after"]
    lines += ["", "## KL to the prompted model (held-out contexts, measured by the bake)", "",
              f"KL(prompted ‖ base) {_pm(before['per_token'], before['per_token_se'], 4)} → "
              f"KL(prompted ‖ baked) {_pm(after['per_token'], after['per_token_se'], 4)} "
              f"nats/token on {before['sequences']} samples; reduction "
              f"{_pct(kl.get('reduction'), kl.get('reduction_se'))}.", "",
              "## Half-baking curve", "", "| strength | KL nats/token | reduction |",
              "|---:|---:|---:|"]
    strength = record["strength"]
    for a, k in strength["points"].items():
        lines.append(f"| {a} | {_pm(k['per_token'], k['per_token_se'], 4)} | "
                     f"{_pct(strength['reduction'][a], None)} |")
    lines += ["", "![strength](report-strength.png)"]
    if "report-snapshots.png" in wrote:
        lines += ["", "![snapshots](report-snapshots.png)"]
    if "reprompt" in record:
        lines += ["", "## Re-prompt matrix (task scores, the same items in every cell)", ""]
        for name, m in record["reprompt"].items():
            c = m["cells"]
            lines += [f"| {name} | base | baked |", "|---|---:|---:|",
                      f"| without u | {_score(c['base'])} | {_score(c['baked'])} |",
                      f"| with u | {_score(c['base+u'])} | {_score(c['baked+u'])} |", ""]
            if m["recovery"] is not None:
                lines += [f"The bake recovers {_pct(m['recovery'], m['recovery_se'])} of the "
                          f"prompt's effect on {name}.", ""]
        gate = record["forgetting"]
        lines += ["## Forgetting", "", f"Gate: {gate['rule']} — "
                  f"**{'pass' if gate['passed'] else 'FAIL'}**.", "",
                  "| task | base | baked | relative | p | gate | base + u | baked vs base + u |",
                  "|---|---:|---:|---:|---:|---|---:|---|"]
        beyond = record["forgetting_vs_prompted"]
        for t in gate["tasks"].values():
            b = beyond["tasks"][t["task"]]
            lines.append(f"| {t['task']} | {_score(t['base'])} | {_score(t['baked'])} | "
                         f"{_relative(t)} | {t['p_value']:.3g} | "
                         f"{'FAIL' if t['failed'] else 'pass'} | {_score(b['base'])} | "
                         f"{_relative(b)}, p {b['p_value']:.3g}"
                         f"{': damage' if t['task'] in beyond['damaged'] else ''} |")
        lines += ["", "The last column compares the baked model with the prompted one. A prompt "
                  "can itself lower a task, and a bake that reproduces the prompt reproduces "
                  "that; a task that fails the gate against both base and base + u was damaged "
                  "by baking."]
        lines += ["", "![forgetting](report-forgetting.png)"]
    if "drift" in record:
        d = record["drift"]
        lines += ["", f"## Persona drift ({d['persona']})", "",
                  "| model | adherence, first turns | at the last turn | drift |",
                  "|---|---:|---:|---:|"]
        for label in ("prompted", "baked"):
            x = d[label]["drift"]["adherence"]
            lines.append(f"| {label} | {_pm(x['first'], x['first_se'])} | "
                         f"{_pm(x['at_value'], x['at_value_se'])} | "
                         f"{_pm(x['drift'], x['drift_se'])} |")
        lines += ["", "![drift](report-drift.png)"]
    if "pursuit" in record:
        p = record["pursuit"]
        lines += ["", "## Prompt pursuit", "", f"Tracked: {p['tracked']}; stopped: "
                  f"{p['stopped']}; kept round {p['best_round']}.", "",
                  "| round | KL(base + u ‖ model) /token | tracked |", "|---:|---:|---:|"]
        for r in p["rounds"]:
            k = r["kl_to_prompted"]
            lines.append(f"| {r['round']} | {_pm(k['per_token'], k['per_token_se'], 4)} | "
                         f"{r['metric']:.4f} |")
        lines += ["", "![pursuit](report-pursuit.png)"]
    return "\n".join(lines) + "\n"


def _record_files(path: Path, names: list[str]) -> None:
    """Lists the report's files in the directory's marker, so a later ``--overwrite`` removes
    them with the rest of what promptbake wrote."""
    from promptbake.bake import _MARKER, _RunDir

    if (path / _MARKER).is_file():
        _RunDir(path, identity="").wrote(*names)


def _command(path, tasks, limit, persona, turns, conversations, strengths) -> str:
    parts = [f"promptbake report {path}"]
    if tasks is not None:
        parts.append(f"--tasks {','.join(tasks) or 'none'}")
    parts.append(f"--limit {limit if limit is not None else 0}")
    if persona is not None:
        parts.append(f"--persona {persona or 'none'}")
    if (turns, conversations) != (30, 3):
        parts.append(f"--turns {turns} --conversations {conversations}")
    if tuple(strengths) != STRENGTHS:
        parts.append("--strength " + ",".join(f"{a:g}" for a in strengths))
    return " ".join(parts)


def _pm(value, se, digits: int = 3) -> str:
    if value is None:
        return "?"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _pct(value, se) -> str:
    if value is None:
        return "?"
    return f"{100 * value:.1f}%" + ("" if se is None else f" ± {100 * se:.1f}%")


def _score(s: dict) -> str:
    return _pm(s["value"], s["se"])


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
