"""Engine suite: the baking engine on the default model with the example pipeline, measured.

Three runs on the same cycles, the example pipeline's (the four computing tools, cycle ``tools``;
the pirate persona, cycle ``pirate``), each kept in bench/.cache/ so that an interrupted run
resumes where it stopped:

1. the engine as the example pipeline declares it: each round the incumbent prompt, rewrites the
   current model proposes and programmatic edits, scored on the dev split, the winner baked on
   top of the current model;
2. the same engine on the user's own prompts only (no proposals, no edits): what self-guided
   discovery adds is the paired difference of 1 and 2 on the held-out items (when your prompt
   won every round of 1, run 2 would make the same bakes and choices: it is taken from 1);
3. sequential baking of the user's prompts without the engine (tools, pirate, tools, ... each
   baked on top of the last, every cycle measured after every bake) for the engine's wall
   time: the last bake is the one that ends nearest it.

Each final model is scored without any prompt on every cycle's held-out split, beside the base
model prompted with each cycle's own prompt: end-to-end accuracy for the tools, adherence for
the persona. Checks: the engine's final model reaches >= 90% of the tool-prompted base model's
end-to-end accuracy and >= 90% of the persona-prompted base model's adherence, at the same time;
the plateau rule stops within two rounds of the score curve's plateau (the curve: each cycle's
held-out score over sequential baking's bakes of the same prompts, which go on past any
plateau). Also the total wall time and its split by phase.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

import harness
from common import CACHE
from promptbake import bake, files, load_baked, models, pipeline as pipeline_mod, tools
from promptbake.config import BakeConfig
from promptbake.artifact import contexts_key
from promptbake.engine import (HISTORY, Cycle, evaluator_key, outcome_settings,
                               run_engine)
from promptbake.orchestrate.stacking import LoraStack
from promptbake.report import candidate_sources, sources_table
from promptbake.reprompt import item_scores
from promptbake.stats import paired_difference

EXAMPLE = Path(pipeline_mod.__file__).parent / "data" / "pipelines" / "example.toml"
TARGET_SHARE = 0.90
TARGET_PLATEAU_ROUNDS = 2
RUNS = ("engine", "own prompts", "sequential")


def run(args, log) -> dict:
    torch.set_num_threads(2)
    quick = args.quick
    suffix = "-quick" if quick else ""
    pipeline = pipeline_mod.load(EXAMPLE)
    if quick:  # a smoke run: small bakes, two rounds, few items and tool questions
        shrink(pipeline, "engine", dev=4, held_out=8)
        pipeline.engine = dataclasses.replace(pipeline.engine, max_rounds=2, proposals=1,
                                              edits=1, proposal_tokens=48)
    lm, tokenizer, model_dir = models.load(pipeline.model)
    log("  the example pipeline's cycles (the tool cycle's conversations are written by the "
        "prompted model)")
    cycles = pipeline_mod.build_cycles(pipeline, lm, tokenizer, lambda m: log(f"    {m}"))
    framing = pipeline.bake.framing
    results, finals = {}, {}
    for name, config in (("engine", pipeline.engine),
                         ("own prompts", dataclasses.replace(pipeline.engine, proposals=0,
                                                             edits=0))):
        if name == "own prompts" and won_by_your_prompts(results["engine"]["rounds"]):
            log("  own prompts: your prompt won every round of the engine run, so this run "
                "would make the same bakes and choices: taken from it, not run again")
            results[name], finals[name] = own_prompts_of(results["engine"]), finals["engine"]
            continue
        log(f"  {name}: the engine, {config.proposals} proposals and {config.edits} edits a "
            f"round, at most {config.max_rounds} rounds")
        out = CACHE / f"{'engine' if name == 'engine' else 'engine-own'}{suffix}"
        made = run_engine(cycles, model=pipeline.model, config=config,
                          bake_config=pipeline.bake, out=out, say=lambda m: log(f"    {m}"))
        # seconds: its work over every call (a rerun reads a finished run back in seconds),
        # the references (not recorded by runs before 2026-12-04: 0), then each round
        references = json.loads((out / HISTORY).read_text()).get("references_seconds", 0.0)
        results[name] = {**made.to_dict(), "references_seconds": references}
        finals[name] = made.baked
    budget = results["engine"]["seconds"]
    log(f"  sequential baking of the user's prompts for the engine's wall time ({budget:.0f} s)")
    results["sequential"], finals["sequential"] = sequential(
        cycles, model_dir, pipeline.bake, budget, CACHE / f"engine-sequential{suffix}", log)

    log("  every final model without a prompt, and the base model with each cycle's prompt, on "
        "the held-out splits")
    scores = {name: held_out(cycles, (baked.model, baked.tokenizer) if baked is not None
                             else (lm, tokenizer), None, framing)
              for name, baked in finals.items() if not results[name].get("derived")}
    if results["own prompts"].get("derived"):  # the same model: the same scores
        scores["own prompts"] = scores["engine"]
    scores["prompted base"] = {c.name: measure(c, c.held_out(lm, tokenizer, c.prompt,
                                                             framing=framing)) for c in cycles}
    scores["base"] = held_out(cycles, (lm, tokenizer), None, framing)
    result = {"suite": "engine", "machine": harness.machine(), "pipeline": str(EXAMPLE),
              "bake": dataclasses.asdict(pipeline.bake),
              "engine": dataclasses.asdict(pipeline.engine),
              "runs": results, "scores": {n: {c: s.to_dict() for c, s in by.items()}
                                          for n, by in scores.items()},
              "shares": {c.name: share(scores["engine"][c.name], scores["prompted base"][c.name])
                         for c in cycles},
              "discovery": {c.name: paired(scores["own prompts"][c.name],
                                           scores["engine"][c.name]) for c in cycles},
              "versus_sequential": {c.name: paired(scores["sequential"][c.name],
                                                   scores["engine"][c.name]) for c in cycles},
              "plateau": plateaus(cycles, results["own prompts"]["rounds"],
                                  results["sequential"]["rounds"], pipeline.engine.threshold,
                                  pipeline.engine.patience, results["own prompts"]["references"]),
              "sources": candidate_sources(results["engine"]["rounds"]),
              "phases": phases(results["engine"])}
    result["checks"] = checks(result)
    return result


def won_by_your_prompts(rounds: list[dict]) -> bool:
    """Whether every round was won by the incumbent prompt with none failed: then the engine on
    your own prompts alone (no proposals, no edits) makes the same bakes and choices (the
    bakes are seeded by round; tests/orchestrate/test_engine.py checks it on the tiny model)."""
    return bool(rounds) and all("failed" not in r and r["winner"]["index"] == 0 for r in rounds)


def own_prompts_of(run: dict) -> dict:
    """The own-prompts run as the engine run's rounds with the incumbent its only candidate;
    its wall time was not measured (the engine's includes scoring the other candidates)."""
    rounds = [{**r, "candidates": r["candidates"][:1]} for r in run["rounds"]]
    return {**run, "rounds": rounds, "seconds": None, "derived": "engine"}


def shrink(pipeline, name: str, dev: int, held_out: int) -> None:
    """A --quick run's pipeline: small bakes (over a tool cycle's defaults too), ``dev`` and
    ``held_out`` items a cycle, and 16 tool questions (cached as ``<name>-quick-questions``)."""
    small = {"train_contexts": 8, "eval_contexts": 4, "probe_contexts": 0, "epochs": 1.0,
             "max_new_tokens": 32}
    pipeline.bake = BakeConfig(**small)
    pipeline.bake_given = frozenset(small)
    questions = CACHE / f"{name}-quick-questions.jsonl"
    questions.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(questions, "\n".join(json.dumps(r)
                                          for r in tools.shipped.train_rows()[::12][:16]))
    pipeline.cycles = [{**c, "dev": dev, "held_out": held_out,
                        **({"contexts": str(questions)} if "tools" in c else {})}
                       for c in pipeline.cycles]


def measure(cycle: Cycle, score):
    """What a cycle is judged on: end-to-end accuracy for a tool cycle, else its score."""
    return tools.metrics(score)["end_to_end"] if isinstance(cycle.held_out, tools.ToolUse) \
        else score


def held_out(cycles: list[Cycle], model_and_tokenizer, prompt, framing: str) -> dict:
    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        return {c.name: measure(c, c.held_out(model, tokenizer, prompt, framing=framing))
                for c in cycles}


def sequential(cycles: list[Cycle], model_dir, bake_config: BakeConfig, budget: float,
               out: Path, log) -> tuple[dict, object]:
    """Bakes the cycles' own prompts in turn, each on top of the last (``LoraStack``), every
    cycle's held-out split measured after each bake, for ``budget`` seconds: every cycle once,
    then each further bake if it should end nearer the budget than stopping before it does
    (its cycle's previous bake's time is the estimate), so neither side gets a bake's worth
    more time. Each state is saved before the history that names it, so a killed run resumes
    from its last recorded bake; a history made with other prompts, contexts, settings or
    model is started afresh. Returns (the history, the last state)."""
    history = out / "sequential.json"
    identity = _identity(cycles, model_dir, bake_config)
    saved = json.loads(history.read_text()) if history.is_file() else {}
    if saved.get("identity") != identity:
        if saved:
            log("    the cached sequential bakes were made otherwise: starting afresh")
        saved = {"identity": identity, "rounds": []}
    rounds = saved["rounds"]
    stack = LoraStack(load_baked(out / rounds[-1]["state"], model=model_dir)) if rounds else None
    while len(rounds) < len(cycles) or _next_ends_nearer(rounds, cycles, budget):
        number = len(rounds) + 1
        cycle = cycles[(number - 1) % len(cycles)]
        log(f"    sequential bake {number}: {cycle.name}")
        start = time.perf_counter()
        config = dataclasses.replace(bake_config, **cycle.bake, seed=bake_config.seed + number,
                                     merge=False)  # the seeds the engine's rounds use
        if stack is None:
            stack = LoraStack(bake(cycle.prompt, model=model_dir, contexts=cycle.contexts,
                                   config=config))
        else:
            stack.push(cycle.prompt, config, cycle.contexts)
        current = stack.current
        with torch.no_grad():
            scores = {c.name: c.held_out(current.model, current.tokenizer, None,
                                         framing=bake_config.framing).to_dict() for c in cycles}
        state = f"state-{number}"
        out.mkdir(parents=True, exist_ok=True)
        files.replace_dir(out / state, lambda tmp, baked=current: (tmp.rmdir(), baked.save(tmp)))
        rounds.append({"round": number, "cycle": cycle.name, "held_out": scores,
                       "seconds": round(time.perf_counter() - start, 2), "state": state})
        harness.write_json(history, saved)
        log("    " + ", ".join(f"{c} {s['value']:.3f}" for c, s in scores.items()))
    saved["seconds"] = sum(r["seconds"] for r in rounds)
    return saved, stack.current


def _next_ends_nearer(rounds: list[dict], cycles: list[Cycle], budget: float) -> bool:
    """Whether the next sequential bake ends nearer ``budget`` than stopping now does."""
    used = sum(r["seconds"] for r in rounds)
    cycle = cycles[len(rounds) % len(cycles)].name
    before = [r["seconds"] for r in rounds if r["cycle"] == cycle]
    return used + (before[-1] if before else 0.0) / 2 < budget


def _identity(cycles: list[Cycle], model_dir, bake_config: BakeConfig) -> str:
    """What sequential baking's results depend on: the cycles' prompts, contexts (a file by
    its contents), bake settings and held-out splits, the bake settings and the model."""
    described = {"cycles": [[c.name, c.prompt, contexts_key(c.contexts), c.bake,
                             evaluator_key(c.held_out)] for c in cycles],
                 "bake": outcome_settings(bake_config), "model": models.fingerprint(model_dir)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def share(final, prompted) -> dict:
    """The final model's score as a share of the prompted base model's."""
    value = final.value / prompted.value if prompted.value else None
    return {"final": final.value, "final_se": final.se, "prompted": prompted.value,
            "prompted_se": prompted.se, "share": value}


def paired(before, after) -> dict:
    """after - before on the same items, with its error."""
    difference, se, n = paired_difference(item_scores(before), item_scores(after))
    return {"before": before.value, "after": after.value, "difference": difference, "se": se,
            "n": n}


def curve_plateau(values: list[float], threshold: float, patience: int = 1,
                  start: float | None = None) -> int | None:
    """The bake (1-based) at which a rule with ``patience`` sees the curve's plateau: the
    ``patience``-th bake that gains no more than ``threshold`` (relative) on the best before
    it, with no later bake gaining either. ``start`` is the score before bake 1 (the engine
    judges its first round against the base model's). None when no such bake is on the curve
    yet (the last bakes still gain, or too few follow the last gain)."""
    series = ([start] if start is not None else []) + list(values)
    first = 1 if start is not None else 0  # series[first] is bake 1
    for at in range(1, len(series)):
        best = max(series[:at])
        if all(v <= best * (1 + threshold) for v in series[at:]):
            seen = at - first + patience  # bake number of the patience-th bake without gain
            return seen if seen <= len(values) else None
    return None


def plateaus(cycles: list[Cycle], engine_rounds: list[dict], sequential_rounds: list[dict],
             threshold: float, patience: int = 1, references: dict | None = None) -> dict:
    """Per cycle: the held-out curve over sequential baking's bakes of it (after the base
    model's score in ``references``), the bake at which a rule with ``patience`` sees its
    plateau, and the own round (failed rounds not counted, as the engine does not count them)
    at which the engine, on the same prompts, declared one."""
    out = {}
    for c in cycles:
        curve = [r["held_out"][c.name]["value"] for r in sequential_rounds if r["cycle"] == c.name]
        own = [r for r in engine_rounds if r["cycle"] == c.name and "held_out" in r]
        declared = next((k + 1 for k, r in enumerate(own) if r.get("plateau")), None)
        base = references[c.name]["base"]["value"] if references else None
        found = curve_plateau(curve, threshold, patience, base)
        out[c.name] = {"curve": curve, "curve_plateau": found, "declared": declared,
                       "within": None if found is None or declared is None
                       else abs(declared - found) <= TARGET_PLATEAU_ROUNDS}
    return out


def phases(run: dict) -> dict:
    """The engine's wall time by phase: references (the base model with and without each
    prompt), then the rounds' scoring, proposing, baking and held-out measuring."""
    total = {"references": run["references_seconds"]}
    for r in run["rounds"]:
        for phase, seconds in r.get("phases", {}).items():
            if phase != "total":
                total[phase] = total.get(phase, 0.0) + seconds
    return {"total": run["seconds"], **total}


def checks(result) -> list[dict]:
    shares = result["shares"]
    reached = [s["share"] is not None and s["share"] >= TARGET_SHARE for s in shares.values()]
    plateau = result["plateau"]
    judged = [p["within"] for p in plateau.values() if p["within"] is not None]
    return [
        {"target": f"the final model without a prompt >= {100 * TARGET_SHARE:.0f}% of the "
                   f"prompted base model on every cycle, at once",
         "measured": ", ".join(f"{c} {100 * s['share']:.0f}%" if s["share"] is not None
                               else f"{c} (prompted base scores 0)" for c, s in shares.items()),
         "pass": all(reached)},
        {"target": f"the plateau rule stops within {TARGET_PLATEAU_ROUNDS} rounds of the "
                   f"curve's plateau",
         "measured": ", ".join(f"{c}: declared at own round {p['declared'] or '-'}, the "
                               f"curve's at bake {p['curve_plateau'] or '- (not seen)'}"
                               for c, p in plateau.items()) +
                     ("" if judged else " (no cycle has both: not shown)"),
         "pass": bool(judged) and all(judged)},
    ]


def _pm(value, se) -> str:
    return f"{value:+.3f} ± {se or 0:.3f}"


def report(result) -> str:
    scores = result["scores"]
    cycles = list(result["shares"])
    lines = [harness.table(["model (held-out, no prompt unless said)", *cycles],
                           [[name, *[f"{by[c]['value']:.3f} ± {by[c]['se'] or 0:.3f}"
                                     for c in cycles]] for name, by in scores.items()]), ""]
    for label, key in (("self-guided discovery (engine - own prompts)", "discovery"),
                       ("engine - sequential baking at equal wall time", "versus_sequential")):
        lines.append(f"{label}: " + ", ".join(f"{c} {_pm(d['difference'], d['se'])} "
                                              f"(n {d['n']})" for c, d in result[key].items()))
    runs = result["runs"]
    lines.append("rounds: " + ", ".join(
        f"{name} {len(runs[name]['rounds'])} ({runs[name].get('stopped', 'time budget')}, " +
        ("taken from the engine run: your prompt won every round" if runs[name].get("derived")
         else f"{runs[name]['seconds']:.0f} s") + ")" for name in RUNS))
    lines.append("candidates by source (engine run): " + ", ".join(
        f"{s['source']} won {s['won']} of {s['candidates']}" for s in result["sources"]))
    lines.append("engine wall time by phase: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in result["phases"].items()))
    lines += ["", harness.checks_table(result["checks"])]
    return "\n".join(lines)


def markdown(result) -> str:
    mach = result["machine"]
    cycles = list(result["shares"])
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}", "", *harness.checks_markdown(result["checks"])]
    lines += ["", "| model (held-out) | " + " | ".join(cycles) + " |",
              "|---|" + "---:|" * len(cycles)]
    for name, by in result["scores"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{by[c]['value']:.3f} ± {by[c]['se'] or 0:.3f}" for c in cycles) + " |")
    lines += ["", "| comparison (paired, held-out) | " + " | ".join(cycles) + " |",
              "|---|" + "---:|" * len(cycles)]
    for label, key in (("engine - own prompts (discovery)", "discovery"),
                       ("engine - sequential, equal wall time", "versus_sequential")):
        lines.append(f"| {label} | " + " | ".join(
            _pm(result[key][c]["difference"], result[key][c]["se"]) for c in cycles) + " |")
    if result["runs"]["own prompts"].get("derived"):
        lines += ["", "Your prompt won every round of the engine run, so the own-prompts run "
                  "(the same bakes and choices) was taken from it: discovery added nothing."]
    lines += ["", "Candidates of the engine run, by source:", "",
              *sources_table(result["sources"])]
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = list(result["shares"])
    fig, axes = plt.subplots(1, len(cycles), figsize=(5 * len(cycles), 3.8))
    for ax, cycle in zip(axes if len(cycles) > 1 else [axes], cycles):
        for name in RUNS:
            rounds = result["runs"][name]["rounds"]
            xs = [r["round"] for r in rounds if "held_out" in r]
            ys = [r["held_out"][cycle]["value"] for r in rounds if "held_out" in r]
            ax.plot(xs, ys, marker="o", label=name)
        prompted = result["runs"]["engine"]["references"][cycle]["prompted"]["value"]
        ax.axhline(prompted, color="k", ls="--", lw=0.8, label="base + prompt")
        ax.set(title=f"{cycle}: held-out score after each round", xlabel="round")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
