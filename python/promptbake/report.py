"""One report of what a bake did: every line a measurement, with the command that reproduces it.

``promptbake report DIR`` writes ``report.md``, ``report.json`` and ``report-*.png`` into the
baked directory: the KL before and after, the half-baking curve (MC-KL against the strength,
and against the snapshot step when there are snapshots), the re-prompt matrix of every task,
the task scores and the forgetting gate, persona drift over a long conversation (prompted against
baked; scored by a persona, or by a scorer derived from the prompt), the off-distribution KL
(the probe set; flagged when far below the held-out reduction), the rounds of prompt pursuit
when the directory holds them, and a table of gates: each target, the measured value, pass or
fail, and the command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Callable

from promptbake import contexts as contexts_mod, drift as drift_mod, files, mc_kl, plotting
from promptbake.artifact import load_baked, record_files, snapshot_steps
from promptbake.bake import off_distribution_record
from promptbake.forgetting import check_suite, plot_heatmap
from promptbake.framing import prompt_text
from promptbake.formatting import pct, pm, short
from promptbake.orchestrate.plateau import meets_target
from promptbake.persona import MissingExtraError, Persona, SemanticScorer, persona_of
from promptbake.reprompt import RepromptMatrix
from promptbake.tasks import load_task, shipped

log = logging.getLogger("promptbake")

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MIN_REDUCTION = 0.90  # the held-out KL reduction a default bake reaches (python bench/ --only bake)
MAX_OFF_GAP = 0.10  # off-distribution reduction this far below held-out flags the bake
PROBES = 24  # probes measured for a bake from before the probe set
# manifest kinds of states that stack several bakes in one adapter, whose manifest is the first
# bake's (with the kind's own record beside it)
STACKED = {"engine": "an engine run's kept state", "engine-round": "an engine round's state",
           "sequential": "sequential baking's last state"}


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
           teacher_model: str | Path | None = None,
           say: Callable[[str], None] | None = None) -> dict:
    """Measures a baked directory and writes its report there; returns the report's record.

    Args:
        tasks: task names or .jsonl files (default: the shipped suite); [] skips the tasks.
        limit: items per task (None: every item; the default keeps a report to minutes).
        persona: a built-in persona name or a persona JSON file for the drift section; default:
            the built-in persona whose prompt is the baked prompt, else a scorer derived from the
            prompt (``persona.persona_of``; drift is skipped, with the reason, when the prompt
            changes the answers too little to derive one); "" skips drift.
        teacher_model: for a bake from a separate teacher (``bake(teacher_model=...)``), that
            teacher's directory if it moved. Every comparison with "prompted" is then with the
            teacher reading the prompt: KL, the re-prompt matrix, the gates and drift.
        say: called with a line before each section (the CLI prints it).
    """
    say = say or log.info
    path = Path(path)
    baked = load_baked(path, model=model)
    command = _command(path, tasks, limit, persona, turns, conversations, strengths,
                       teacher_model)
    # the gates' commands, each reproducing one part: with the teacher's directory if given
    where = f"{path}" + ("" if teacher_model is None else f" --teacher-model {teacher_model}")
    record: dict = {"directory": str(path.resolve()), "prompt": prompt_text(baked.prompt),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": command, "manifest_kl": baked.manifest["kl"]}
    gates: list[Gate] = []
    wrote: list[str] = ["report.md", "report.json"]
    clock = time.perf_counter()
    kind = baked.manifest.get("kind")
    own_kl = kind not in STACKED  # a stacked state's manifest KL is its first bake's: no gate
    if not own_kl:
        record["stacked"] = (
            f"{STACKED[kind]}: several bakes stacked in one adapter. The prompt measured here "
            f"is its first bake's, and the KL the manifest records is that bake's alone"
            + ("; promptbake report on the engine directory reports every cycle"
               if kind.startswith("engine") else ""))
        say(f"note: {record['stacked']}")

    kl = baked.manifest["kl"]
    if kl.get("reduction") is not None and own_kl:
        gates.append(Gate(f"held-out KL reduction >= {MIN_REDUCTION:.0%}",
                          pct(kl["reduction"], kl.get("reduction_se")),
                          kl["reduction"] >= MIN_REDUCTION, f"promptbake kl {where}"))
    teacher = mc_kl.teacher_of(baked, teacher_model)  # a separate teacher it learned from
    if teacher is not None:
        name = baked.manifest["teacher_model"]["name"]
        record["teacher_model"] = baked.manifest["teacher_model"]
        say(f"note: this bake learned from the teacher model {name}: \"prompted\" below is "
            f"{name} with the prompt, not the base model with it")
    off = baked.manifest.get("kl_off_distribution")
    if off is None:  # a bake from before the probe set: measure it now
        say("off-distribution KL on the probe set")
        found = mc_kl.mc_kl(baked, contexts_mod.PROBE_NAME, teacher=teacher)
        off = off_distribution_record(found["base"], found["1"],
                                      len(contexts_mod.probe(PROBES)))
    record["kl_off_distribution"] = off
    if off.get("reduction") is not None and kl.get("reduction") is not None and own_kl:
        gates.append(off_distribution_gate(kl, off, f"promptbake kl {where}"))

    say("half-baking curve: MC-KL at each strength")
    found = mc_kl.mc_kl(baked, strengths=strengths, teacher=teacher)
    base = found.pop("base")
    points = {float(a): k for a, k in found.items()}
    record["strength"] = {"base": base.to_dict(),
                          "points": {f"{a:g}": k.to_dict() for a, k in points.items()},
                          "reduction": {f"{a:g}": mc_kl.reduction(base, k)[0]
                                        for a, k in points.items()}}
    mc_kl.plot_curve(points, path / "report-strength.png", "strength (scale of the LoRA delta)",
                        "Half-baking: KL to the prompted model", reference=base)
    wrote.append("report-strength.png")
    snapshots = snapshot_steps(path)
    if snapshots:
        say(f"baking progress: MC-KL at {len(snapshots)} snapshots")
        steps = mc_kl.snapshot_curve(baked, [d for _, d in snapshots], teacher=teacher)
        record["snapshots"] = {str(s): k.to_dict() for s, k in steps.items()}
        mc_kl.plot_curve({float(s): k for s, k in steps.items()},
                            path / "report-snapshots.png", "optimizer step",
                            "Baking progress: KL to the prompted model", reference=base)
        wrote.append("report-snapshots.png")

    names = shipped() if tasks is None else list(tasks)
    if names:
        suite = check_suite(baked, [load_task(name, limit=limit) for name in names], say=say,
                            teacher=teacher)
        record.update(suite.to_dict())
        gate, beyond, damaged = suite.gate, suite.beyond, suite.damaged
        plot_heatmap({short(prompt_text(baked.prompt)): gate}, path / "report-forgetting.png")
        wrote.append("report-forgetting.png")
        worst = gate.worst
        gates.append(Gate(f"forgetting: {gate.describe_rule()}",
                          "no task dropped" if worst is None or worst.relative >= 0 else
                          f"worst {worst.task} {100 * worst.relative:+.1f}% (p = "
                          f"{worst.p_value:.2g})", gate.passed,
                          f"promptbake evaluate {where} --tasks {','.join(suite.matrices)}"
                          + (f" --limit {limit}" if limit else "")))
        # Against the prompted model too: what fails both was done by baking (beyond_prompt).
        gates.append(Gate("forgetting beyond the prompt's own effect: no task fails the gate "
                          "both against base and against base + u",
                          "none" if not damaged else "; ".join(
                              f"{n} {100 * beyond.changes[n].relative:+.1f}% against base + u "
                              f"(p = {beyond.changes[n].p_value:.2g})" for n in damaged),
                          not damaged, command))

    chosen, semantic = (Persona.load(persona) if persona else None), None
    if persona is None:  # the built-in persona whose prompt was baked, else one derived from it
        try:
            chosen = persona_of(baked, max_new_tokens=drift_tokens, teacher=teacher)
            semantic = SemanticScorer(chosen)
        except MissingExtraError:
            raise
        except ValueError as err:  # a prompt too weak to derive a scorer from: report the rest
            say(f"persona drift skipped: {err}")
            record["drift_skipped"], chosen = str(err), None
    if chosen is not None:
        say(f"persona drift over {turns} turns: prompted, then baked (adherence scorer: "
            f"{chosen.describe()})")
        k = min(3, turns)  # drift = adherence over the first k turns minus at turn N
        runs = drift_mod.drift_modes(baked, chosen, modes=("prompted", "baked"), turns=turns,
                                     conversations=conversations, max_new_tokens=drift_tokens,
                                     semantic=semantic, teacher=teacher)
        prompted, baked_run = runs["prompted"], runs["baked"]
        difference = drift_mod.drift_difference(baked_run, prompted, k=k)
        record["drift"] = {"persona": chosen.name, "scorer": chosen.describe(),
                           "prompted": prompted.to_dict(k=k),
                           "baked": baked_run.to_dict(k=k), "baked_minus_prompted": difference}
        reader = "base" if teacher is None else "teacher"
        drift_mod.plot_drift({f"prompted ({reader} + u)": prompted, "baked (no prompt)": baked_run},
                             path / "report-drift.png")
        wrote.append("report-drift.png")
        b, p = baked_run.drift(k=k), prompted.drift(k=k)
        again = "" if chosen.derived and not persona else f" --persona {persona or chosen.name}"
        gates.append(Gate(f"persona drift at turn {turns}: baked no worse than prompted",
                          f"baked {b['drift']:+.3f}, prompted {p['drift']:+.3f} "
                          f"(difference {pm(difference['drift'], difference['drift_se'])})",
                          b["drift"] <= p["drift"],
                          f"promptbake report {where}{again} --turns {turns} "
                          f"--conversations {conversations}"))

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
                          meets_target(metrics, len(metrics) - 1, rounds["threshold"]),
                          "promptbake pursue BAKED --out " + str(path)))

    record["gates"] = [g.to_dict() for g in gates]
    record["seconds"] = round(time.perf_counter() - clock, 1)
    files.write_text(path / "report.json", files.to_json(record, indent=2))
    files.write_text(path / "report.md", _markdown(record, gates, wrote))
    record_files(path, wrote)
    return record


def off_distribution_gate(kl: dict, off: dict, command: str) -> Gate:
    """Flags a bake that holds only where it was trained: its off-distribution KL reduction is
    more than ``MAX_OFF_GAP`` below the held-out one, beyond twice their combined error."""
    gap = kl["reduction"] - off["reduction"]
    error = math.hypot(kl.get("reduction_se") or 0.0, off.get("reduction_se") or 0.0)
    far = gap > MAX_OFF_GAP and gap > 2 * error
    return Gate(f"off-distribution KL reduction not far below held-out (at most "
                f"{100 * MAX_OFF_GAP:.0f} points lower, or within 2 errors)",
                f"{pct(off['reduction'], off.get('reduction_se'))} vs held-out "
                f"{pct(kl['reduction'], kl.get('reduction_se'))}", not far, command)


def _plot_pursuit(rounds: dict, path: Path) -> None:
    xs = [r["round"] for r in rounds["rounds"]]
    with plotting.figure(path, ncols=2, figsize=(10, 4)) as (_, grid):
        axes = grid[0]
        kl = [r["kl_to_prompted"] for r in rounds["rounds"]]
        axes[0].errorbar(xs, [k["per_token"] for k in kl],
                         yerr=[k["per_token_se"] or 0 for k in kl], marker="o", capsize=3)
        axes[0].set(xlabel="round", ylabel="KL(base + u || model), nats/token",
                    title="Distance to the prompted base model")
        scores = [r["score"] for r in rounds["rounds"]]
        if all(s is not None for s in scores):
            axes[1].errorbar(xs, [s["value"] for s in scores],
                             yerr=[s["se"] or 0 for s in scores], marker="o", capsize=3)
            axes[1].set(xlabel="round", ylabel=scores[0]["metric"], title=scores[0]["task"])
        else:
            axes[1].plot(xs, [r["metric"] for r in rounds["rounds"]], marker="o")
            axes[1].set(xlabel="round", ylabel=rounds["tracked"], title="tracked metric")


def _relative(change: dict) -> str:
    return "—" if change["relative"] is None else f"{100 * change['relative']:+.1f}%"


def _markdown(record: dict, gates: list[Gate], wrote: list[str]) -> str:
    kl = record["manifest_kl"]
    stacked = record.get("stacked")
    teacher = (record.get("teacher_model") or {}).get("name")
    lines = [f"# Bake report: {record['directory']}", "",
             f"Prompt: {record['prompt']!r}", "",
             *([f"**Note**: {stacked}.", ""] if stacked else []),
             *([(f"**Note**: this bake learned the prompted behaviour of the teacher model "
                 f"{teacher}: \"prompted\" here (the KL's reference, the re-prompt matrix's "
                 f"base + u cells, drift) is {teacher} with the prompt."), ""]
               if teacher else []),
             f"Made by `{record['command']}` on {record['created']} ({record['seconds']:.0f} s).",
             "", "## Gates", "", "| target | measured | result | reproduce |", "|---|---|---|---|"]
    for g in gates:
        lines.append(f"| {g.target} | {g.measured} | {'pass' if g.passed else 'FAIL'} | "
                     f"`{g.command}` |")
    before, after = kl["before"], kl["after"]
    lines += ["", "## KL to the prompted model (held-out contexts, measured by the "
              + ("first bake, before the others stacked on it)" if stacked else "bake)"), "",
              f"KL(prompted ‖ base) {pm(before['per_token'], before['per_token_se'], '.4f')} → "
              f"KL(prompted ‖ baked) {pm(after['per_token'], after['per_token_se'], '.4f')} "
              f"nats/token on {before['sequences']} samples; reduction "
              f"{pct(kl.get('reduction'), kl.get('reduction_se'))}.", ""]
    off = record.get("kl_off_distribution")
    if off:
        b, a = off["before"], off["after"]
        lines += ["## Off-distribution KL (probe set: kinds of input the bake did not train on"
                  + ("; the first bake's" if stacked else "") + ")",
                  "", f"KL(prompted ‖ base) {pm(b['per_token'], b['per_token_se'], '.4f')} → "
                  f"KL(prompted ‖ baked) {pm(a['per_token'], a['per_token_se'], '.4f')} "
                  f"nats/token on {b['sequences']} samples; reduction "
                  f"{pct(off.get('reduction'), off.get('reduction_se'))}. Kinds: "
                  f"{', '.join(off.get('kinds', []))}.", ""]
    lines += ["## Half-baking curve", "", "| strength | KL nats/token | reduction |",
              "|---:|---:|---:|"]
    strength = record["strength"]
    for a, k in strength["points"].items():
        lines.append(f"| {a} | {pm(k['per_token'], k['per_token_se'], '.4f')} | "
                     f"{pct(strength['reduction'][a], None)} |")
    lines += ["", "![strength](report-strength.png)"]
    if "report-snapshots.png" in wrote:
        lines += ["", "![snapshots](report-snapshots.png)"]
    if "reprompt" in record:
        lines += ["", "## Re-prompt matrix (task scores, the same items in every cell)", ""]
        for name, m in record["reprompt"].items():
            c = m["cells"]
            lines += [f"| {name} | base | baked |", "|---|---:|---:|",
                      f"| without u | {_score(c['base'])} | {_score(c['baked'])} |",
                      f"| with u | {_score(c['prompted'])} | {_score(c['baked+prompt'])} |", ""]
            said = RepromptMatrix(name, {}, m["recovery"], m["recovery_se"],
                                  m.get("effect")).describe_recovery()
            lines += [said[0].upper() + said[1:] + ".", ""]
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
            lines.append(f"| {label} | {pm(x['first'], x['first_se'])} | "
                         f"{pm(x['at_value'], x['at_value_se'])} | "
                         f"{pm(x['drift'], x['drift_se'])} |")
        lines += ["", "![drift](report-drift.png)"]
    if "pursuit" in record:
        p = record["pursuit"]
        lines += ["", "## Prompt pursuit", "", f"Tracked: {p['tracked']}; stopped: "
                  f"{p['stopped']}; kept round {p['best_round']}.", "",
                  "| round | KL(base + u ‖ model) /token | tracked |", "|---:|---:|---:|"]
        for r in p["rounds"]:
            k = r["kl_to_prompted"]
            lines.append(f"| {r['round']} | {pm(k['per_token'], k['per_token_se'], '.4f')} | "
                         f"{r['metric']:.4f} |")
        lines += ["", "![pursuit](report-pursuit.png)"]
    return "\n".join(lines) + "\n"


def _command(path, tasks, limit, persona, turns, conversations, strengths,
             teacher_model=None) -> str:
    parts = [f"promptbake report {path}"]
    if teacher_model is not None:
        parts.append(f"--teacher-model {teacher_model}")
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


def _score(s: dict) -> str:
    return pm(s["value"], s["se"])


# -- an engine run -----------------------------------------------------------------------------

ENGINE_GATE = 0.90  # the share of the prompted base model's held-out score the kept state reaches


def engine_report(run_dir: str | Path, out: str | Path | None = None) -> list[str]:
    """The history of an engine run (its ``engine.json``) as ``engine-report.md``,
    ``engine-report.json`` and ``engine-report.png`` in ``out`` (default: ``run_dir``): every
    round's candidates with their dev scores and the winner, every cycle's held-out score after
    each round (relative to the base model prompted with the cycle's prompt; plotted), the
    plateaus and survival flags, and the gates of the kept state. Returns the names written."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    try:
        saved = json.loads((run_dir / "engine.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{run_dir} holds no readable engine run (engine.json: {err}); pass the "
                         f"directory promptbake run or run_engine wrote") from err
    refs, rounds = saved["references"], saved["rounds"]
    result = saved.get("result") or {}
    best = result.get("best_round")
    kept = next((r for r in rounds if r["round"] == best and "held_out" in r), None)
    gates = []
    for cycle, ref in refs.items():
        prompted = ref["prompted"]["value"]
        value = kept["held_out"][cycle]["value"] if kept else ref["base"]["value"]
        share = value / prompted if prompted > 0 else None
        gates.append({"target": f"{cycle}: kept model without a prompt >= "
                                f"{ENGINE_GATE:.0%} of the prompted base model (held out)",
                      "measured": f"{value:.3f} vs {prompted:.3f}" + (
                          f" ({100 * share:.0f}%)" if share is not None else ""),
                      "passed": share is not None and share >= ENGINE_GATE})
    for cycle, found in (result.get("survival") or {}).items():
        gates.append({"target": f"{cycle}: never below its survival share of its best",
                      "measured": "flagged" if found["flagged"] else "held",
                      "passed": not found["flagged"]})
    seconds = result.get("seconds", sum(r.get("seconds", 0) for r in rounds))
    lines = [f"# Engine run: {run_dir}", "",
             (f"Stopped: {result.get('stopped', 'still running')}; kept round: {best} "
              f"(0 is the base model); {len(rounds)} rounds in {seconds:.0f} s."), "",
             *([f"Bakes taught by the {saved['settings']['teacher']} model"
                + (f", rehearsing {saved['settings']['rehearse']:g}× a bake's contexts from each "
                   f"cycle baked before" if saved["settings"].get("rehearse") else "")
                + ".", ""] if saved.get("settings", {}).get("teacher") else []),
             "## Gates", "", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {g['target']} | {g['measured']} | {'pass' if g['passed'] else 'FAIL'} |"
              for g in gates]
    cycles = list(refs)
    lines += ["", "## Held-out scores without a prompt, after each round", "",
              "| round | cycle | winner | dev: winner − incumbent | " + " | ".join(cycles) +
              " | objective | notes |", "|---:|---|---|---|" + "---:|" * len(cycles) + "---:|---|",
              "| 0 | — | — | — | " + " | ".join(f"{refs[c]['base']['value']:.3f}" for c in cycles)
              + " | | base model; prompted: " + ", ".join(
                  f"{c} {refs[c]['prompted']['value']:.3f}" for c in cycles) + " |"]
    for r in rounds:
        if "failed" in r:
            lines.append(f"| {r['round']} | {r['cycle']} | — | — | " + " | ".join(
                "—" for _ in cycles) + f" | | failed: {short(r['failed'], 60)} |")
            continue
        w = r["winner"]
        notes = [n for n, on in (("weak teacher: the prompt keeps "
                                  f"{100 * r.get('weak_teacher', 0):.0f}% of its gain",
                                  "weak_teacher" in r),
                                 ("rehearsed " + ", ".join(
                                     f"{c} ({n} contexts)"
                                     for c, n in r.get("rehearsed", {}).items()),
                                  r.get("rehearsed")),
                                 ("plateau", r.get("plateau")),
                                 ("fallen: " + ", ".join(r.get("fallen", [])), r.get("fallen")),
                                 ("kept", r["round"] == best)) if on]
        lines.append(f"| {r['round']} | {r['cycle']} | {w['source']} | "
                     f"{pm(w.get('difference', 0.0), w.get('se'), '+.3f')} | " + " | ".join(
                         f"{r['held_out'][c]['value']:.3f}" for c in cycles) +
                     f" | {r['objective']:.3f} | {'; '.join(notes)} |")
    lines += ["", "## Candidate sources", "", *sources_table(candidate_sources(rounds))]
    lines += ["", "## Candidates", "", "| round | source | dev score | prompt |",
              "|---:|---|---:|---|"]
    for r in rounds:
        for c in r.get("candidates", []):
            lines.append(f"| {r['round']} | {c['source']} | {pm(c['dev']['value'], c['dev']['se'])}"
                         f" | {short(prompt_text(c['prompt']).replace('|', '/'), 70)} |")
    lines += ["", "![held-out scores after each round](engine-report.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "engine-report.md", "\n".join(lines))
    files.write_text(out / "engine-report.json", files.to_json(
        {"run": str(run_dir.resolve()), "gates": gates, "history": saved}, indent=2))
    _plot_engine(refs, rounds, out / "engine-report.png")
    return ["engine-report.md", "engine-report.json", "engine-report.png"]


def candidate_sources(rounds: list[dict]) -> list[dict]:
    """Which kinds of candidate won an engine run's rounds (``engine.json``'s ``rounds``): per
    kind (the incumbent, each meta-prompt's rewrites, each kind of edit; demonstration numbers
    dropped), how many were scored, how many scored above their round's incumbent on the dev
    split, how many won a round, and their mean dev score minus the incumbent's with its
    standard error over the candidates (None for fewer than two)."""
    kinds: dict[str, dict] = {}
    for r in rounds:
        found, winner = r.get("candidates") or [], (r.get("winner") or {}).get("index")
        if not found or "failed" in r:  # a failed round's winner was not kept
            continue
        incumbent = found[0]["dev"]["value"]  # a round scores its incumbent first
        for k, c in enumerate(found):
            kind = kinds.setdefault(re.sub(r"\s+\d+$", "", c["source"]),
                                    {"candidates": 0, "above": 0, "won": 0, "differences": []})
            kind["candidates"] += 1
            kind["won"] += k == winner
            if k:
                kind["differences"].append(c["dev"]["value"] - incumbent)
                kind["above"] += c["dev"]["value"] > incumbent
    out = []
    for source, kind in kinds.items():
        d = kind.pop("differences")
        mean = sum(d) / len(d) if d else None
        se = (math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
              if len(d) > 1 else None)
        out.append({"source": source, **kind, "mean_difference": mean, "se": se})
    return out


def sources_table(sources: list[dict]) -> list[str]:
    """``candidate_sources`` as the lines of a markdown table."""
    lines = ["| source | candidates | above the incumbent (dev) | won | dev − incumbent |",
             "|---|---:|---:|---:|---:|"]
    for kind in sources:
        mean = kind["mean_difference"]
        lines.append(f"| {kind['source']} | {kind['candidates']} | "
                     f"{'—' if kind['source'] == 'incumbent' else kind['above']} | "
                     f"{kind['won']} | {'—' if mean is None else pm(mean, kind['se'], '+.3f')} |")
    return lines


def _plot_engine(refs: dict, rounds: list[dict], path: Path) -> None:
    measured = [r for r in rounds if "held_out" in r]
    with plotting.figure(path, figsize=(8, 4)) as (_, grid):
        ax = grid[0][0]
        for cycle, ref in refs.items():
            scale = ref["prompted"]["value"] if ref["prompted"]["value"] > 0 else 1.0
            xs = [0] + [r["round"] for r in measured]
            ys = [ref["base"]["value"] / scale] + [r["held_out"][cycle]["value"] / scale
                                                    for r in measured]
            line = ax.plot(xs, ys, marker="o", label=cycle)[0]
            own = [r["round"] for r in measured if r["cycle"] == cycle and r.get("plateau")]
            ax.plot(own, [ys[xs.index(x)] for x in own], "s", ms=10, mfc="none",
                    color=line.get_color())
        ax.axhline(ENGINE_GATE, color="k", ls="--", lw=0.8)
        ax.set(xlabel="round", ylabel="held-out score / prompted base model's",
               title="Each cycle after every round (squares: plateau)")
        ax.legend(fontsize=8)
