"""Prompts suite: do the defaults hold for the prompts users bring, not only the pirate?

A panel of prompts of different kinds (two personas, an output format, a language, a style, a
narrow-domain assistant, a reasoning recipe), each baked with the defaults on the shipped
contexts. Per prompt: the held-out KL reduction (contexts like the training ones) and the
off-distribution one (the probe set: kinds the bake did not train on), persona drift of the
prompted and the baked model over a scripted conversation (scored by the pirate's persona, or by
a scorer derived from the prompt), the task suite against the prompted model, and the bake's
time. Then the narrow-domain and a persona prompt baked on contexts the model generated for them
alone (``--contexts generated:200``): KL reduction on their own held-out part, on the shipped
held-out contexts and off distribution, and what generation added to the bake's wall time.
"""

from __future__ import annotations

import dataclasses
import re
import time

import harness
from common import PIRATE, cached_bake
from evaluate import Parts
from promptbake import BakeConfig, contexts as contexts_mod, drift as drift_mod, generated
from promptbake import load_baked, mc_kl
from promptbake.artifact import read_manifest
from promptbake.forgetting import check_suite
from promptbake.persona import persona_of
from promptbake.tasks import load_task, shipped

PANEL = {
    "pirate (persona)": PIRATE,
    "cat (persona)": "You are Whiskers, a house cat who can talk. You answer every message as a "
                     "cat would: you purr, you mention naps, sunny windowsills and fish, and you "
                     "are easily distracted by anything that moves.",
    "JSON (output format)": 'Reply only with a JSON object with two keys: "answer", a short '
                            'string, and "confidence", a number between 0 and 1. Never write '
                            'anything outside the JSON object.',
    "French (language)": "Always answer in French, whatever language the user writes in.",
    "terse (style)": "Answer in one short plain sentence. No greetings, no lists, no "
                     "follow-up questions, no exclamation marks.",
    "SQL (narrow domain)": "You are a SQL assistant. Answer every question with a single SQL "
                           "query for a PostgreSQL database, then one sentence explaining it.",
    "step by step (reasoning recipe)": "Before answering, think step by step: restate the "
                                       "question in one line, list the facts you need, work "
                                       "through them, and end with a line that starts with "
                                       "'Answer:'.",
}
GENERATED = ("SQL (narrow domain)", "cat (persona)")  # also baked on generated contexts alone
GENERATED_N = 200
TARGET_HELD_OUT = 0.90
TARGET_OFF = 0.85
TARGET_GENERATION_SHARE = 0.20


def _slug(name: str) -> str:
    return re.sub(r"[^a-z]+", "-", name.split(" (")[0].lower()).strip("-")


def run(args, log) -> dict:
    import torch

    torch.set_num_threads(2)
    quick = args.quick
    config = BakeConfig(train_contexts=16, eval_contexts=8, epochs=1.0) if quick else \
        BakeConfig()
    suffix = "-quick" if quick else ""
    limit = 8 if quick else 40  # task items per task
    turns, conversations = (4, 2) if quick else (10, 3)
    # Every bake first (the KL targets read their manifests), then the slower drift and task
    # suite, each part cached: an interrupted run keeps what it measured and resumes there.
    count = 24 if quick else GENERATED_N
    bakes = {}
    for name, prompt in PANEL.items():
        log(f"  {name}: the default bake")
        bakes[name] = cached_bake(f"panel-{_slug(name)}{suffix}", prompt, config, log=log)
        manifest = read_manifest(bakes[name]["path"])  # the model is loaded later, once
        log(f"    KL reduction held-out {pct(_kl(manifest['kl']))}, off-distribution "
            f"{pct(_kl(manifest['kl_off_distribution']))}")
    on_generated = {name: _on_generated(name, count, config, suffix, quick, log)
                    for name in GENERATED}
    panel = {}
    for name, made in bakes.items():
        log(f"  {name}: drift and the task suite")
        baked = load_baked(made["path"])
        parts = Parts(baked, {"quick": quick, "suite": "prompts", "prompt": name}, log)
        manifest = baked.manifest
        row = {"prompt": PANEL[name], "kl": _kl(manifest["kl"]),
               "off": _kl(manifest["kl_off_distribution"]),
               "bake_seconds": manifest["wall_seconds"]["total"]}
        row["drift"] = parts.get(f"prompts-drift-{_slug(name)}", lambda baked=baked: _drift(
            baked, turns, conversations), turns=turns, conversations=conversations)
        suite = parts.get(f"prompts-suite-{_slug(name)}", lambda baked=baked: check_suite(
            baked, [load_task(t, limit=limit) for t in shipped()], say=log).to_dict(),
            limit=limit)
        row["vs_prompted"] = _against_prompted(suite["forgetting_vs_prompted"])
        row["forgetting_passed"] = suite["forgetting"]["passed"]
        panel[name] = row
    result = {"suite": "prompts", "machine": harness.machine(),
              "config": dataclasses.asdict(config), "task_limit": limit,
              "drift": {"turns": turns, "conversations": conversations},
              "panel": panel, "generated": on_generated}
    result["checks"] = checks(result)
    return result


def _on_generated(name: str, count: int, config: BakeConfig, suffix: str, quick: bool,
                  log) -> dict:
    """``name``'s prompt baked on ``count`` generated contexts alone, measured on its own held-out
    part, on the shipped held-out contexts and off distribution; generation's share of the bake."""
    prompt = PANEL[name]
    log(f"  {name}: baked on {count} generated contexts alone")
    made = cached_bake(f"panel-{_slug(name)}-generated{suffix}", prompt, config,
                       contexts=f"generated:{count}", log=log)
    baked = load_baked(made["path"])
    parts = Parts(baked, {"quick": quick, "suite": "prompts", "prompt": name}, log)
    shipped_held_out = contexts_mod.builtin("held_out")[:config.eval_contexts]
    shipped_kl = parts.get(f"prompts-generated-shipped-{_slug(name)}",
                           lambda: _measure(baked, shipped_held_out))
    start = time.perf_counter()
    again = generated.generated_contexts(prompt, count, seed=config.seed)
    seconds = baked.manifest["wall_seconds"]
    return {"own": _kl(baked.manifest["kl"]), "off": _kl(baked.manifest["kl_off_distribution"]),
            "shipped": shipped_kl,
            "generation": baked.manifest["contexts"]["generated"],
            "generate_seconds": seconds.get("generate", 0.0),
            "bake_seconds": seconds["total"],
            "generate_share": seconds.get("generate", 0.0) /
            max(seconds["total"] - seconds.get("generate", 0.0), 1e-9),
            "cached_again": {"cached": again.cached, "seconds": time.perf_counter() - start},
            "examples": [c[-1]["content"] for c in again.contexts[:6]]}


def _kl(record: dict) -> dict:
    return {"before": record["before"]["per_token"], "after": record["after"]["per_token"],
            "reduction": record["reduction"], "se": record["reduction_se"]}


def _measure(baked, contexts) -> dict:
    """MC-KL of base and baked on ``contexts``, sampled from the prompted model."""
    found = mc_kl.mc_kl(baked, contexts)
    r, se = mc_kl.reduction(found["base"], found["1"])
    return {"before": found["base"].per_token, "after": found["1"].per_token, "reduction": r,
            "se": se}


def _drift(baked, turns: int, conversations: int) -> dict:
    """Adherence drift of the prompted and the baked model on the same scripted turns."""
    scorer = persona_of(baked)
    found = drift_mod.drift_modes(baked, scorer, modes=("prompted", "baked"), turns=turns,
                                  conversations=conversations)
    k = min(3, turns)
    return {"scorer": scorer.describe(),
            **{mode: r.drift(k=k) for mode, r in found.items()},
            "baked_minus_prompted": drift_mod.drift_difference(found["baked"], found["prompted"],
                                                               k=k)}


def _against_prompted(beyond: dict) -> dict:
    changes = {task: c["relative"] for task, c in beyond["tasks"].items()
               if c.get("relative") is not None}
    worst = min(changes, key=changes.get) if changes else None
    return {"damaged": beyond["damaged"], "worst": worst,
            "worst_relative": changes.get(worst) if worst else None}


def checks(result) -> list[dict]:
    panel = result["panel"]
    low = {n: r["kl"]["reduction"] for n, r in panel.items()
           if r["kl"]["reduction"] < TARGET_HELD_OUT}
    off = {n: r["off"]["reduction"] for n, r in panel.items()
           if r["off"]["reduction"] < TARGET_OFF}
    out = [
        {"target": f"every prompt >= {TARGET_HELD_OUT:.0%} held-out KL reduction (defaults)",
         "measured": "all" if not low else "; ".join(f"{n} {100 * v:.1f}%"
                                                      for n, v in low.items()),
         "pass": not low},
        {"target": f"every prompt >= {TARGET_OFF:.0%} off-distribution KL reduction",
         "measured": "all" if not off else "; ".join(f"{n} {100 * v:.1f}%"
                                                      for n, v in off.items()),
         "pass": not off},
    ]
    for name, g in result["generated"].items():
        worst = min(g["own"]["reduction"], g["shipped"]["reduction"])
        out.append({"target": f"{name} baked on generated contexts alone: >= "
                              f"{TARGET_HELD_OUT:.0%} on its own domain and on the shipped "
                              f"held-out contexts",
                    "measured": f"own {100 * g['own']['reduction']:.1f}%, shipped "
                                f"{100 * g['shipped']['reduction']:.1f}%",
                    "pass": worst >= TARGET_HELD_OUT})
        out.append(_generation_check(name, g))
    return out


def _generation_check(name: str, g: dict) -> dict:
    target = (f"{name}: generation adds <= {TARGET_GENERATION_SHARE:.0%} to the bake's wall "
              f"time, nothing when cached")
    if g["generation"]["cached"]:  # the bake generated nothing: there is no share to measure
        return {"target": target, "pass": None,
                "measured": "not measured: the bake found its contexts already generated "
                            "(delete ~/.cache/promptbake/contexts and the bake to measure)"}
    again = g["cached_again"]
    return {"target": target,
            "measured": f"{100 * g['generate_share']:.0f}% ({g['generate_seconds']:.0f} s of "
                        f"{g['bake_seconds']:.0f} s); again: {again['seconds']:.1f} s "
                        f"({'cached' if again['cached'] else 'NOT cached'})",
            "pass": g["generate_share"] <= TARGET_GENERATION_SHARE and again["cached"]}


def pct(d: dict) -> str:
    return f"{100 * d['reduction']:.1f}% ± {100 * (d['se'] or 0):.1f}%"


def _drift_cell(d: dict, mode: str) -> str:
    return f"{d[mode]['drift']:+.3f} ± {d[mode]['drift_se'] or 0:.3f}"


def _rows(result) -> list[list[str]]:
    rows = []
    for name, r in result["panel"].items():
        d, v = r["drift"], r["vs_prompted"]
        rows.append([name, pct(r["kl"]), pct(r["off"]),
                     _drift_cell(d, "prompted") if "prompted" in d else "—",
                     _drift_cell(d, "baked") if "baked" in d else "—",
                     ", ".join(v["damaged"]) or "none",
                     f"{v['worst']} {100 * v['worst_relative']:+.1f}%" if v["worst"] else "—",
                     f"{r['bake_seconds']:.0f}"])
    return rows


HEADERS = ["prompt", "held-out KL reduction", "off-distribution", "drift prompted",
           "drift baked", "damaged vs prompted", "worst task vs prompted", "bake s"]


def report(result) -> str:
    lines = [harness.table(HEADERS, _rows(result)), ""]
    for name, g in result["generated"].items():
        lines.append(f"{name} on {g['generation']['contexts']} generated contexts: own "
                     f"{pct(g['own'])}, shipped held-out {pct(g['shipped'])}, off "
                     f"{pct(g['off'])}; generation {g['generate_seconds']:.0f} s")
    lines += ["", harness.checks_table(result["checks"])]
    return "\n".join(lines)


def markdown(result) -> str:
    mach = result["machine"]
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}; default settings; task suite {result['task_limit']} items "
             f"per task; drift over {result['drift']['turns']} turns x "
             f"{result['drift']['conversations']} conversations (first 3 turns minus the last)",
             "", *harness.checks_markdown(result["checks"])]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|---" + "|---:" * (len(HEADERS) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    lines += ["", "| baked on generated contexts alone | contexts (written, dropped) | own "
                  "held-out | shipped held-out | off-distribution | generation s | bake s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, g in result["generated"].items():
        made = g["generation"]
        dropped = ", ".join(f"{n} {r}" for r, n in made["dropped"].items() if n)
        lines.append(f"| {name} | {made['contexts']} ({made['written']} written; {dropped}) | "
                     f"{pct(g['own'])} | {pct(g['shipped'])} | {pct(g['off'])} | "
                     f"{g['generate_seconds']:.0f} | {g['bake_seconds']:.0f} |")
    for name, g in result["generated"].items():
        lines += ["", f"Generated for {name}, the first six: " +
                  "; ".join(f"“{t}”" for t in g["examples"])]
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["panel"])
    fig, ax = plt.subplots(figsize=(11, 4))
    x = range(len(names))
    for offset, key, label in ((-0.2, "kl", "held-out"), (0.2, "off", "off-distribution")):
        ax.bar([i + offset for i in x], [100 * result["panel"][n][key]["reduction"] for n in names],
               width=0.4, yerr=[100 * (result["panel"][n][key]["se"] or 0) for n in names],
               capsize=3, label=label)
    ax.axhline(100 * TARGET_HELD_OUT, color="grey", ls="--", lw=1)
    ax.axhline(100 * TARGET_OFF, color="grey", ls=":", lw=1)
    ax.set_xticks(list(x), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set(ylabel="KL reduction, %", ylim=(0, 105), title="the defaults on a panel of prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
