"""Evaluate suite: what two bakes did to the default model, measured.

1. The README's pirate persona (the default bake): its re-prompt matrix on persona adherence
   (single answers to the held-out contexts), adherence over the strength alpha and over the
   bake's snapshots (the half-baking curves), forgetting across the whole task suite (the gate),
   and persona drift over 30 turns, prompted against baked, on the same scripted conversations.
2. A step-by-step arithmetic recipe with worked examples, baked on arithmetic questions that are
   not in the task: its re-prompt matrix on the arithmetic task (how much of the prompt's gain
   over the base model the bake recovers) and its forgetting across the suite.
3. Prompt pursuit from the arithmetic bake, tracked by arithmetic accuracy: every round, and
   where its plateau stop ends it (the target), replayed on the same rounds.

A plain "Think step by step." system prompt does not change SmolLM2-135M's arithmetic (measured:
+0.000 ± 0.043 on the 120 items, paired), so the recipe shows the model worked examples.

Targets: forgetting gate passes for the persona bake; baked drift at turn 30 no worse than
prompted drift; the arithmetic bake recovers >= 80% of the prompted model's gain over base;
pursuit improves on a single bake or stops within two rounds of its plateau.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import harness
from common import CACHE, PIRATE, answer_counts, cached_bake, pirate_config
from promptbake import (BakeConfig, contexts as contexts_mod, drift as drift_mod,
                        forgetting as fg, load_baked, persona as persona_mod, pursue, reprompt)
from promptbake.modeling import BAKED, PROMPTED, variant
from promptbake.orchestrate.plateau import meets_target, plateau_round, stopping
from promptbake.reprompt import saved_cell
from promptbake.tasks import TASKS, Score, load_task

RECIPE = ("You are a careful calculator. Examples:\n"
          "Q: What is 7 * 8?\nA: 7 * 8 = 56. The answer is 56.\n"
          "Q: What is 35 + 48?\nA: 35 + 48 = 83. The answer is 83.\n"
          "Q: What is 91 - 37?\nA: 91 - 37 = 54. The answer is 54.\n"
          "Q: What is 23 * 14?\nA: 23 * 14 = 23 * 10 + 23 * 4 = 230 + 92 = 322. The answer is 322.\n"
          "Answer every question the same way.")
TARGET_RECOVERY = 0.80
TURNS = 30


def arithmetic_contexts(count: int, seed: int = 0, exclude=()) -> list[str]:
    """Questions in the arithmetic task's four kinds that ask no sum a task item or a question in
    ``exclude`` asks (in any order or wording: ``contexts.arithmetic_key``), taken in turn from
    each kind's shuffled pool of unused questions (one-digit products run out first: 36 pairs
    exist and the task asks 24 of them)."""
    taken = {contexts_mod.arithmetic_key(q)
             for q in [item["prompt"] for item in TASKS["arithmetic"].items] + list(exclude)}
    kinds = [[f"What is {a} + {b}?" for a in range(10, 100) for b in range(10, 100)],
             [f"What is {a} - {b}?" for a in range(50, 100) for b in range(10, 50)],
             [f"What is {a} * {b}?" for a in range(2, 10) for b in range(2, 10)],
             [f"What is {a} * {b}?" for a in range(11, 40) for b in range(11, 20)]]
    rng = random.Random(seed)
    pools = []
    for kind in kinds:
        keyed = {contexts_mod.arithmetic_key(q): q for q in kind}  # one question per sum
        pool = [q for key, q in keyed.items() if key not in taken]
        rng.shuffle(pool)
        pools.append(pool)
    if count > sum(map(len, pools)):
        raise ValueError(f"only {sum(map(len, pools))} arithmetic questions are not task items; "
                         f"asked for {count}")
    found: list[str] = []
    while len(found) < count:
        for pool in pools:
            if pool and len(found) < count:
                found.append(pool.pop())
    return found


SECTIONS = ("persona", "recipe", "pursuit")


def run(args, log) -> dict | None:
    """The whole suite, or with ``--section`` only some of its parts (saved for the next whole
    run, which reuses them: two processes, one per section, finish sooner on 2 cores)."""
    sections = [s for s in SECTIONS if s in (args.section or SECTIONS)]  # argparse checks names
    plan = Plan.of(args.quick, log)
    result = {"suite": "evaluate", "machine": harness.machine(), "quick": plan.quick,
              "limit": plan.limit}
    if "persona" in sections or "recipe" in sections:
        log("  1. the pirate persona")
        pirate = plan.bake("pirate", PIRATE, plan.persona_config)
        log("    the task suite on the base model")
        base_suite = {t.name: pirate.parts.score(
            f"pirate-base-{t.name}", lambda t=t: reprompt.score(
                pirate.model, t, adapter=False, prompted=False), task=t) for t in plan.tasks}
    if "persona" in sections:
        result["persona"], persona_gate, drifts = _persona(plan, pirate, base_suite)
    if "recipe" in sections or "pursuit" in sections:
        log("  2. the arithmetic recipe, baked on arithmetic questions")
        recipe = plan.bake("recipe", RECIPE, plan.recipe_config, contexts=plan.questions)
    if "recipe" in sections:
        result["recipe"], recipe_gate = _recipe(plan, recipe, base_suite)
    if "pursuit" in sections:
        log("  3. prompt pursuit from the arithmetic bake")
        result["pursuit"], result["pursuit_curve"] = _pursuit(plan, recipe)

    result["parts_seconds"] = plan.seconds
    if sections != list(SECTIONS):
        log(f"    measured and saved: {', '.join(sections)}; the results are written by a run "
            f"of every section (it reuses these parts)")
        return None
    fg.plot_heatmap({"pirate persona": persona_gate, "arithmetic recipe": recipe_gate},
                    args.out / "evaluate-forgetting.png")
    plot_half_baking(result["persona"], args.out)
    drift_mod.plot_drift({"prompted (base + u)": drifts["prompted"],
                          "baked (no prompt)": drifts["baked"]}, args.out / "evaluate-drift.png")
    result["checks"] = checks(result)
    return result


@dataclasses.dataclass
class Plan:
    """The run's settings (full or --quick) and what its parts share."""

    quick: bool
    limit: int | None  # items per task
    turns: int
    conversations: int
    persona_config: BakeConfig
    recipe_config: BakeConfig
    tasks: list  # the suite
    arithmetic: object  # the arithmetic task
    questions: Path  # the recipe's training questions
    log: object
    seconds: dict = dataclasses.field(default_factory=dict)  # part -> wall s, every bake's

    @classmethod
    def of(cls, quick: bool, log) -> Plan:
        limit = 12 if quick else None
        persona_config = pirate_config(quick)
        questions = CACHE / "arithmetic-contexts.txt"
        harness.write_text(questions, "\n".join(arithmetic_contexts(48 if quick else 144)) + "\n")
        # 18 conversations: with 6, the baked-minus-prompted drift had an error of +-0.16
        turns, conversations = (6, 2) if quick else (TURNS, 18)
        return cls(quick, limit, turns, conversations, persona_config,
                   dataclasses.replace(persona_config, max_new_tokens=96, snapshot_every=0),
                   [load_task(name, limit=limit) for name in TASKS],
                   load_task("arithmetic", limit=limit), questions, log)

    @property
    def settings(self) -> dict:
        """What every part depends on (the drift parts key their turns and conversations)."""
        return {"quick": self.quick, "limit": self.limit}

    def bake(self, name: str, prompt: str, config: BakeConfig, contexts=None) -> Bake:
        made = cached_bake(f"{name}-quick" if self.quick else name, prompt, config,
                           contexts=contexts, log=self.log)
        model = load_baked(made["path"])
        return Bake(made, model, Parts(model, self.settings, self.log, self.seconds))


@dataclasses.dataclass
class Bake:
    made: dict  # cached_bake's record
    model: object  # Baked
    parts: Parts  # its measurements, saved as they finish


def _persona(plan: Plan, pirate: Bake, base_suite: dict):
    """The pirate's adherence matrix, its suite and gates, and its drift: (result, gate, drifts)."""
    parts, model, log = pirate.parts, pirate.model, plan.log
    persona = persona_mod.pirate()
    held_out = contexts_mod.builtin("held_out")[:16 if plan.quick else None]
    adherence = persona_mod.AdherenceEvaluator(persona, held_out)
    matrix = parts.matrix("pirate-adherence", lambda: reprompt.reprompt_matrix(model, adherence),
                          persona=dataclasses.asdict(persona), questions=held_out)
    out = {"bake": {"path": str(pirate.made["path"]), "seconds": pirate.made["seconds"],
                    "kl": model.manifest["kl"]},
           "reprompt": matrix.to_dict(),
           "reprompt_items": {c: s.items for c, s in matrix.cells.items()}}
    log(f"    adherence: base {matrix.cells['base'].value:.3f}, prompted "
        f"{matrix.cells['prompted'].value:.3f}, baked {matrix.cells['baked'].value:.3f}")

    log("    half-baking: adherence over the strength alpha and over the bake's snapshots")
    strengths = [0.25, 0.5, 0.75, 1.25, 1.5]  # 0 and 1 are the matrix's base and baked cells
    out["strength"] = parts.get("pirate-adherence-strength", lambda: {
        f"{a:g}": s.to_dict() for a, s in reprompt.strength_sweep(model, adherence,
                                                                  strengths).items()},
        persona=dataclasses.asdict(persona), questions=held_out, strengths=strengths)
    out["snapshots"] = parts.get("pirate-adherence-snapshots", lambda: {
        str(step): s.to_dict() for step, s in reprompt.snapshot_sweep(
            model, adherence, ends=False).items()},
        persona=dataclasses.asdict(persona), questions=held_out)
    out["last_step"] = reprompt.last_step(model)

    log("    the task suite on the prompted model and the baked one")
    suite = {"base": base_suite}
    suite.update({cell: {t.name: parts.score(
        f"pirate-{cell}-{t.name}", lambda t=t, cell=cell: reprompt.score(
            model, t, variant(cell, model.strength)), task=t)
        for t in plan.tasks} for cell in ("prompted", "baked")})
    check = fg.SuiteCheck.from_cells(suite["base"], suite["prompted"], suite["baked"])
    gate = check.gate
    out["forgetting"] = gate.to_dict()
    # The prompt's own effect on the suite: the bake reproduces base + u, so a drop that the
    # prompted model shows too comes from the persona, not from baking.
    out["prompted_suite"] = fg.compare(suite["base"], suite["prompted"]).to_dict()
    out["baked_vs_prompted"] = {**check.beyond.to_dict(), "damaged": check.damaged}
    log(f"    forgetting gate: {'pass' if gate.passed else 'FAIL'}")
    out["arithmetic_answers"] = {cell: answer_counts(scores["arithmetic"],
                                                     TASKS["arithmetic"].max_new_tokens)
                                 for cell, scores in suite.items()}

    log(f"    drift over {plan.turns} turns, prompted then baked")
    options = dict(turns=plan.turns, conversations=plan.conversations, max_new_tokens=48)
    semantic = persona_mod.SemanticScorer(persona)
    drifts = {}
    for mode, chosen, system in (("prompted", PROMPTED, PIRATE), ("baked", BAKED, None)):
        def measure(chosen=chosen, system=system):
            with chosen.active(model.model):
                return drift_mod.drift(model.model, model.tokenizer, persona, system=system,
                                       semantic=semantic, **options)
        drifts[mode] = parts.drift(f"pirate-drift-{mode}", measure,
                                   persona=dataclasses.asdict(persona), options=options)
    out["drift"] = {"prompted": drifts["prompted"].to_dict(), "baked": drifts["baked"].to_dict(),
                    "baked_minus_prompted": drift_mod.drift_difference(drifts["baked"],
                                                                       drifts["prompted"])}
    return out, gate, drifts


def _recipe(plan: Plan, recipe: Bake, base_suite: dict):
    """The recipe's arithmetic matrix and its forgetting across the suite: (result, gate)."""
    parts, model, arithmetic = recipe.parts, recipe.model, plan.arithmetic
    matrix = parts.matrix("recipe-arithmetic", lambda: reprompt.reprompt_matrix(model, arithmetic),
                          task=arithmetic)
    plan.log(f"    arithmetic: base {matrix.cells['base'].value:.3f}, prompted "
             f"{matrix.cells['prompted'].value:.3f}, baked {matrix.cells['baked'].value:.3f}")
    scores = {t.name: matrix.cells["baked"] if t.name == "arithmetic" else
              parts.score(f"recipe-baked-{t.name}", lambda t=t: reprompt.score(
                  model, t, BAKED), task=t) for t in plan.tasks}
    gate = fg.compare(base_suite, scores)
    return {"prompt": RECIPE, "bake": {"path": str(recipe.made["path"]),
                                       "seconds": recipe.made["seconds"],
                                       "kl": model.manifest["kl"]},
            "reprompt": matrix.to_dict(), "by_category": _by_category(matrix),
            "forgetting": gate.to_dict()}, gate


def _pursuit(plan: Plan, recipe: Bake):
    """Pursuit from the recipe's bake: every round, and where its plateau stop ends it (the
    target): (stopped, curve)."""
    gated = {"rounds": 1 if plan.quick else 3, "threshold": 0.02, "patience": 1}
    # Round i bakes with seed + i whether or not pursuit stops early, so a pursuit with the
    # plateau stop is a prefix of this run: measured once, the stop replayed on its rounds.
    every = {**gated, "patience": gated["rounds"] + 1}  # a plateau needs more rounds than this
    curve = recipe.parts.get("recipe-pursuit-curve", lambda: pursue(
        recipe.model, evaluator=plan.arithmetic, contexts=str(plan.questions),
        **every).to_dict(), task=plan.arithmetic, pursue=every)
    last, best, why = stopping([r["metric"] for r in curve["rounds"]], gated["threshold"],
                               gated["patience"])
    stopped = {**curve, "rounds": curve["rounds"][:last + 1], "best_round": best, "stopped": why,
               "patience": gated["patience"], "replayed_from": "every round (pursuit_curve)"}
    return stopped, curve


class Parts:
    """Each part of the run saved in bench/.cache/evaluate-parts/ as it finishes, and reused by a
    rerun with the same settings on the same bake (the adapter's bytes are part of the key), so an
    interrupted run of more than an hour resumes where it stopped. Delete the folder to remeasure.
    """

    def __init__(self, baked, settings: dict, log, seconds: dict | None = None):
        adapter = hashlib.sha256(Path(baked.path, "adapter_model.safetensors").read_bytes())
        self.key = {**settings, "bake": str(baked.path), "adapter": adapter.hexdigest()}
        self.base_key = {**settings, "base_model": baked.manifest["base_model"]["sha256"]}
        self.log = log
        self.seconds: dict[str, float] = {} if seconds is None else seconds  # part -> wall s

    def get(self, name: str, measure, task=None, *, base_only: bool = False, **also):
        """``measure()``'s JSON-able result, from the cache when the key matches. The key holds
        the run's settings and the adapter's bytes (only the base model's weights for a part
        measured on the base model alone, ``base_only``: a rebake reuses it), the definition of
        ``task`` (its items, budget and stop strings) and whatever else the part depends on
        (``also``, JSON-able)."""
        key = {**(self.base_key if base_only else self.key), **also}
        if task is not None:
            key["task"] = _task_key(task)
        prefix = "quick-" if self.key["quick"] else ""
        path = CACHE / "evaluate-parts" / f"{prefix}{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.log(f"    reusing {name} (measured in {saved['seconds']:.0f} s)")
                self.seconds[name] = saved["seconds"]
                return saved["value"]
        start = time.perf_counter()
        value = measure()
        self.seconds[name] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(path, {"key": key, "seconds": self.seconds[name], "value": value})
        return value

    def score(self, name: str, measure, task) -> Score:
        return Score(**self.get(name, lambda: measure().to_dict(items=True), task))

    def matrix(self, name: str, measure, task=None, **also) -> reprompt.RepromptMatrix:
        return reprompt.RepromptMatrix.from_dict(
            self.get(name, lambda: measure().to_dict(items=True), task, **also))

    def drift(self, name: str, measure, **also) -> drift_mod.DriftResult:
        return drift_mod.DriftResult.from_dict(self.get(name, lambda: measure().to_dict(),
                                                        **also))


def _task_key(task) -> str:
    """sha256 of what a task's scores depend on."""
    data = {"name": task.name, "items": task.items, "max_new_tokens": task.max_new_tokens,
            "until": list(task.until)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _by_category(matrix) -> dict:
    out = {}
    for cell, score in matrix.cells.items():
        for item in score.items:
            out.setdefault(item.get("category", "all"), {}).setdefault(cell, []).append(
                item["score"])
    return {cat: {cell: sum(v) / len(v) for cell, v in cells.items()} for cat, cells in out.items()}


def checks(result) -> list[dict]:
    gate = result["persona"]["forgetting"]
    prompted = result["persona"]["prompted_suite"]["tasks"]
    failed = [t for t in gate["tasks"].values() if t["failed"]]
    shown = failed or [min((t for t in gate["tasks"].values() if t["relative"] is not None),
                           key=lambda t: t["relative"])]
    damaged = result["persona"]["baked_vs_prompted"]["damaged"]
    d = result["persona"]["drift"]
    b, p = d["baked"]["drift"]["adherence"], d["prompted"]["drift"]["adherence"]
    diff = d["baked_minus_prompted"]
    m = result["recipe"]["reprompt"]
    rec, rec_se = m["recovery"], m["recovery_se"]
    # The stop is judged on every round measured, those after it too: stopping before a later
    # improvement fails the target.
    threshold = result["pursuit"]["threshold"]
    metrics = [r["metric"] for r in result["pursuit_curve"]["rounds"]]
    stopped = result["pursuit"]["rounds"][-1]["round"]
    return [
        {"target": "forgetting gate passes for the persona bake (no task drops > 3.4% relative "
                   "with p < 0.05)",
         "measured": ("failed: " if failed else "worst: ") + "; ".join(
             f"{t['task']} {100 * t['relative']:+.1f}% (p = {t['p_value']:.2g}; the prompted "
             f"model: {_rel(prompted[t['task']])}, p = {prompted[t['task']]['p_value']:.2g})"
             for t in shown),
         "pass": gate["passed"]},
        {"target": "(not a target; beside the gate) tasks the persona bake damages beyond its "
                   "prompt's own effect: failing the gate against base and against base + u",
         "measured": ", ".join(damaged) or "none",
         "pass": None},
        {"target": f"baked drift at turn {d['baked']['turns']} no worse than prompted drift",
         "measured": f"baked {b['drift']:+.3f} ± {b['drift_se'] or 0:.3f}, prompted "
                     f"{p['drift']:+.3f} ± {p['drift_se'] or 0:.3f} (difference "
                     f"{diff['drift']:+.3f} ± {diff['drift_se'] or 0:.3f})",
         "pass": b["drift"] <= p["drift"]},
        {"target": f"the arithmetic bake recovers >= {100 * TARGET_RECOVERY:.0f}% of the prompted "
                   f"model's gain over base",
         "measured": "no gain to recover" if rec is None else
                     f"{100 * rec:.0f}% ± {100 * (rec_se or 0):.0f}% (base "
                     f"{m['cells']['base']['value']:.3f}, prompted "
                     f"{saved_cell(m['cells'], 'prompted')['value']:.3f}, baked "
                     f"{m['cells']['baked']['value']:.3f})",
         "pass": rec is not None and rec >= TARGET_RECOVERY},
        {"target": "pursuit improves on a single bake or stops within two rounds of its plateau",
         "measured": "accuracy by round " + ", ".join(f"{x:.3f}" for x in metrics) +
                     f" (plateau from round {plateau_round(metrics, threshold)}); stopped at "
                     f"round {stopped} ({result['pursuit']['stopped']})",
         "pass": meets_target(metrics, stopped, threshold)},
    ]


def report(result) -> str:
    lines = []
    m = result["persona"]["reprompt"]
    lines.append("pirate persona, adherence on held-out questions (re-prompt matrix):")
    lines.append(_matrix_text(m))
    by_alpha, by_step = half_baking(result["persona"])
    lines.append("half-baking, adherence without the prompt: by strength " + ", ".join(
        f"{a:g}: {s['value']:.3f}" for a, s in by_alpha.items()) + "; by step " + ", ".join(
        f"{k}: {s['value']:.3f}" for k, s in by_step.items()))
    lines.append("forgetting across the suite (pirate bake):")
    lines.append(_gate_text(result["persona"]["forgetting"]))
    lines.append("the pirate prompt itself on the suite (base + u against base):")
    lines.append(_gate_text(result["persona"]["prompted_suite"]))
    answers = result["persona"]["arithmetic_answers"]
    lines.append("arithmetic answers that start with 'Aye' / run out of tokens: " + ", ".join(
        f"{cell} {a['start_with_aye']} / {a['out_of_tokens']} of {a['n']}"
        for cell, a in answers.items()))
    damaged = result["persona"]["baked_vs_prompted"]["damaged"]
    lines.append("damaged by baking (fails the gate against base and against base + u): "
                 + (", ".join(damaged) or "none"))
    d = result["persona"]["drift"]
    for label in ("prompted", "baked"):
        x = d[label]["drift"]["adherence"]
        lines.append(f"drift {label:>8}: first turns {x['first']:.3f}, turn {d[label]['turns']} "
                     f"{x['at_value']:.3f}, drift {x['drift']:+.3f}")
    lines.append("")
    lines.append("arithmetic recipe (re-prompt matrix on the arithmetic task):")
    lines.append(_matrix_text(result["recipe"]["reprompt"]))
    for cat, cells in result["recipe"]["by_category"].items():
        lines.append(f"  {cat:<18} " + "  ".join(f"{c} {v:.2f}" for c, v in cells.items()))
    lines.append("forgetting across the suite (arithmetic bake):")
    lines.append(_gate_text(result["recipe"]["forgetting"]))
    lines.append("")
    lines.append("pursuit rounds (arithmetic accuracy without the prompt):")
    for r in result["pursuit"]["rounds"]:
        lines.append(f"  round {r['round']}: {r['metric']:.3f}; KL(base + u || model) "
                     f"{r['kl_to_prompted']['per_token']:.4f} nats/token")
    lines.append(f"  stopped: {result['pursuit']['stopped']}, kept round "
                 f"{result['pursuit']['best_round']}")
    curve = result["pursuit_curve"]["rounds"]
    lines.append("  every round, no plateau stop: " + ", ".join(
        f"{r['metric']:.3f} ± {r['score']['se'] or 0:.3f}" for r in curve))
    lines.append("")
    lines.append(harness.checks_table(result["checks"]))
    return "\n".join(lines)


def _matrix_text(m: dict) -> str:
    c = m["cells"]

    def cell(name):
        s = saved_cell(c, name)
        return f"{s['value']:.3f} ± {s['se'] or 0:.3f}"

    rec = "—" if m["recovery"] is None else \
        f"{100 * m['recovery']:.0f}% ± {100 * (m['recovery_se'] or 0):.0f}%"
    return (f"  {'':>10} {'base':>15} {'baked':>15}\n"
            f"  {'without u':>10} {cell('base'):>15} {cell('baked'):>15}\n"
            f"  {'with u':>10} {cell('prompted'):>15} {cell('baked+prompt'):>15}\n"
            f"  the bake recovers {rec} of the prompt's effect")


def _gate_text(gate: dict) -> str:
    rows = [[t["task"], f"{t['base']['value']:.3f}", f"{t['baked']['value']:.3f}",
             _rel(t), f"{t['p_value']:.3g}", "FAIL" if t["failed"] else "pass"]
            for t in gate["tasks"].values()]
    return harness.table(["task", "base", "baked", "relative", "p", "gate"], rows) + \
        f"\n  gate: {'pass' if gate['passed'] else 'FAIL'}"


def markdown(result) -> str:
    mach = result["machine"]
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}", "", *harness.checks_markdown(result["checks"])]
    for title, key in (("Pirate persona: adherence", "persona"),
                       ("Arithmetic recipe: accuracy", "recipe")):
        c = result[key]["reprompt"]["cells"]
        lines += ["", f"| {title} | base | baked |", "|---|---:|---:|",
                  f"| without the prompt | {_v(c['base'])} | {_v(c['baked'])} |",
                  f"| with the prompt | {_v(saved_cell(c, 'prompted'))} | "
                  f"{_v(saved_cell(c, 'baked+prompt'))} |"]
    by_alpha, by_step = half_baking(result["persona"])
    lines += ["", "| half-baking (pirate adherence, no prompt) | " +
              " | ".join(f"α {a:g}" for a in by_alpha) + " |",
              "|---|" + "---:|" * len(by_alpha),
              "| by strength | " + " | ".join(_v(s) for s in by_alpha.values()) + " |",
              "", "| | " + " | ".join(f"step {k}" for k in by_step) + " |",
              "|---|" + "---:|" * len(by_step),
              "| by snapshot | " + " | ".join(_v(s) for s in by_step.values()) + " |"]
    lines += ["", "| task | base | pirate prompt (base + u) | pirate bake | pirate bake vs prompt "
              "| arithmetic bake |", "|---|---:|---:|---:|---:|---:|"]
    pg, rg = result["persona"]["forgetting"]["tasks"], result["recipe"]["forgetting"]["tasks"]
    pp = result["persona"]["prompted_suite"]["tasks"]
    vs = result["persona"]["baked_vs_prompted"]["tasks"]
    for task in pg:
        lines.append(f"| {task} | {_v(pg[task]['base'])} | {_v(pp[task]['baked'])} "
                     f"({_p(pp[task])}) | {_v(pg[task]['baked'])} ({_p(pg[task])}) | "
                     f"{_p(vs[task])} | {_v(rg[task]['baked'])} ({_p(rg[task])}) |")
    lines.append("\n(relative change, p: exact McNemar paired by item; the gate fails a drop of "
                 "more than 3.4% with p < 0.05)")
    lines += ["", "| pursuit round | arithmetic, no prompt | KL(base + u ‖ model), nats/token |",
              "|---|---:|---:|"]
    for r in result["pursuit_curve"]["rounds"]:
        kl = r["kl_to_prompted"]
        lines.append(f"| {r['round']} | {_v(r['score'])} | {kl['per_token']:.4f} ± "
                     f"{kl['per_token_se'] or 0:.4f} |")
    p = result["pursuit"]
    lines.append(f"\nWith the plateau rule (threshold {p['threshold']:g}, patience "
                 f"{p['patience']}) pursuit stopped at round {p['rounds'][-1]['round']} "
                 f"({p['stopped']}) and kept round {p['best_round']}.")
    return "\n".join(lines)


def _v(s: dict) -> str:
    return f"{s['value']:.3f} ± {s['se'] or 0:.3f}"


def _p(t: dict) -> str:
    return f"{_rel(t)}, p {t['p_value']:.2g}"


def _rel(t: dict) -> str:
    return "—" if t["relative"] is None else f"{100 * t['relative']:+.1f}%"


def half_baking(persona: dict) -> tuple[dict, dict]:
    """Adherence by strength alpha and by optimizer step, the ends (alpha 0 and 1, step 0 and
    the last) from the re-prompt matrix: ({alpha: score}, {step: score}), scores as dicts."""
    cells = persona["reprompt"]["cells"]
    by_alpha = {0.0: cells["base"], 1.0: cells["baked"],
                **{float(a): s for a, s in persona["strength"].items()}}
    by_step = {0: cells["base"], persona["last_step"]: cells["baked"],
               **{int(k): s for k, s in persona["snapshots"].items()}}
    return dict(sorted(by_alpha.items())), dict(sorted(by_step.items()))


def plot_half_baking(persona: dict, out: Path) -> None:
    """evaluate-strength.png and evaluate-snapshots.png: adherence without the prompt by alpha and
    by step, against the base and the prompted model."""
    def as_score(saved: dict) -> Score:
        return Score(**{**saved, "items": []})

    cells = persona["reprompt"]["cells"]
    references = {"base": as_score(cells["base"]),
                  "prompted (base + u)": as_score(saved_cell(cells, "prompted"))}
    by_alpha, by_step = half_baking(persona)
    for points, name, xlabel, how in ((by_alpha, "strength", "strength alpha (LoRA delta scale)",
                                       "by strength"),
                                      (by_step, "snapshots", "optimizer step", "by steps")):
        reprompt.plot_sweep({x: as_score(s) for x, s in points.items()},
                            out / f"evaluate-{name}.png", xlabel=xlabel,
                            ylabel="pirate adherence, held-out questions",
                            title=f"Half-baking the pirate, {how}", references=references)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for ax, key, title in ((axes[0], "persona", "pirate: adherence"),
                           (axes[1], "recipe", "arithmetic recipe: accuracy")):
        cells = result[key]["reprompt"]["cells"]
        names = list(cells)
        ax.bar(names, [cells[n]["value"] for n in names],
               yerr=[cells[n]["se"] or 0 for n in names], capsize=4,
               color=["#999", "#69c", "#c96", "#c66"])
        ax.set_title(f"re-prompt matrix, {title}")
    d = result["persona"]["drift"]
    for label, style in (("prompted", "s--"), ("baked", "o-")):
        mean = d[label]["curves"]["adherence"]["mean"]
        axes[2].plot(range(1, len(mean) + 1), mean, style, label=label)
    axes[2].set(xlabel="turn", ylabel="persona adherence", title="drift over a conversation")
    axes[2].legend()
    rounds = result["pursuit_curve"]["rounds"]
    axes[3].errorbar([r["round"] for r in rounds], [r["metric"] for r in rounds],
                     yerr=[r["score"]["se"] or 0 for r in rounds], fmt="o-", capsize=4,
                     label="baked, no prompt")
    base = result["recipe"]["reprompt"]["cells"]
    for cell, label, style in (("base", "base", ":"), ("prompted", "base + u", "--")):
        axes[3].axhline(saved_cell(base, cell)["value"], ls=style, color="#777", label=label)
    axes[3].set(xlabel="pursuit round (0: the bake)", ylabel="arithmetic accuracy",
                title="prompt pursuit, every round")
    axes[3].set_xticks([r["round"] for r in rounds])
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
