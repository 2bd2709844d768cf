"""Engine-teachers suite: who should teach a bake made on top of another bake, measured.

The example pipeline's tool prompt is baked into the default model once (the engine's first
round); the pirate persona is then baked on top of that state three ways:

* ``current``: taught by the tool-baked model with the pirate prompt (sequential baking as in
  the paper; the engine's ``teacher = "current"``);
* ``base``: taught by the base model with the pirate prompt (``teacher = "base"``);
* ``base + rehearsal``: the same, with half as many contexts again from the tool cycle, taught by
  the base model with the tool prompt (``rehearse = 0.5``).

Every state is scored without a prompt on both cycles' held-out splits (tool use, end-to-end
tool accuracy, pirate adherence) beside the base model with each cycle's prompt. Check: each
way's share of the prompted base model on both cycles (the engine's 90% gate). Each state and
each way's scores are cached in bench/.cache/engine-teachers/, so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import torch

import harness
from common import CACHE
from engine import EXAMPLE, TARGET_SHARE, _identity, shrink
from promptbake import bake, files, load_baked, models, pipeline as pipeline_mod, tools
from promptbake.bake import Rehearsal
from promptbake.orchestrate.stacking import LoraStack

WAYS = ("current", "base", "base + rehearsal")
REHEARSE = 0.5


def run(args, log) -> dict:
    torch.set_num_threads(2)
    pipeline = pipeline_mod.load(EXAMPLE)
    if args.quick:  # a smoke run: small bakes, few items and tool questions
        shrink(pipeline, "engine-teachers", dev=2, held_out=6)
    lm, tokenizer, model_dir = models.load(pipeline.model)
    log("  the example pipeline's cycles (the tool cycle's conversations are written by the "
        "prompted model)")
    cycles = {c.name: c for c in pipeline_mod.build_cycles(pipeline, lm, tokenizer,
                                                           lambda m: log(f"    {m}"))}
    tool, persona = cycles["tools"], cycles["pirate"]
    framing = pipeline.bake.framing
    out = CACHE / f"engine-teachers{'-quick' if args.quick else ''}"
    identity = _identity(list(cycles.values()), model_dir, pipeline.bake)
    saved_path = out / "results.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    if saved.get("identity") != identity:
        saved = {"identity": identity, "ways": {}}

    def config_of(cycle, seed):
        return dataclasses.replace(pipeline.bake, **cycle.bake, seed=pipeline.bake.seed + seed,
                                   merge=False)

    def scores(model, prompted: bool = False) -> dict:
        """Both cycles' held-out scores of ``model``, each with its own prompt if ``prompted``."""
        with torch.no_grad():
            found = {"pirate": persona.held_out(model, tokenizer,
                                                persona.prompt if prompted else None,
                                                framing=framing)}
            score = tool.held_out(model, tokenizer, tool.prompt if prompted else None,
                                  framing=framing)
        found["tool_use"] = score
        found["tools end-to-end"] = tools.metrics(score)["end_to_end"]
        return {k: v.to_dict() for k, v in found.items()}

    if "references" not in saved:
        log("  the base model, without and with each cycle's prompt")
        saved["references"] = {"base": scores(lm), "prompted base": scores(lm, prompted=True)}
        harness.write_json(saved_path, saved)
    state = out / "tools-state"
    if not (state / "adapter_config.json").is_file() or "tool state" not in saved:
        log("  the tool prompt baked into the base model")
        start = time.perf_counter()
        baked = bake(tool.prompt, model=model_dir, contexts=tool.contexts,
                     config=config_of(tool, 1))  # the seed of the engine's round 1
        out.mkdir(parents=True, exist_ok=True)
        files.replace_dir(state, lambda tmp: (tmp.rmdir(), baked.save(tmp)))
        saved["tool state"] = {"seconds": round(time.perf_counter() - start, 1),
                               "scores": scores(baked.model)}
        harness.write_json(saved_path, saved)
    for way in WAYS:
        if way in saved["ways"]:
            continue
        log(f"  the pirate baked on the tool state, taught by: {way}")
        layers = LoraStack(load_baked(state, model=model_dir))
        config = config_of(persona, 10)
        rehearse = [Rehearsal(tool.prompt, tool.contexts,
                              math.ceil(REHEARSE * config.train_contexts))] \
            if way.endswith("rehearsal") else []
        start = time.perf_counter()
        kl = layers.push(persona.prompt, config, persona.contexts,
                         teacher_model=None if way == "current" else model_dir,
                         rehearse=rehearse)
        saved["ways"][way] = {"bake_seconds": round(time.perf_counter() - start, 1),
                              "kl_reduction": kl["reduction"],
                              "kl_reduction_se": kl["reduction_se"],
                              "scores": scores(layers.current.model)}
        harness.write_json(saved_path, saved)
    result = {"suite": "engine-teachers", "machine": harness.machine(), "pipeline": str(EXAMPLE),
              "bake": dataclasses.asdict(pipeline.bake), "rehearse": REHEARSE, **saved}
    result["checks"] = checks(result)
    return result


def _share(value, prompted) -> float | None:
    return value / prompted if prompted else None


def checks(result) -> list[dict]:
    prompted = result["references"]["prompted base"]
    out = []
    for way in WAYS:
        found = result["ways"][way]["scores"]
        shares = {k: _share(found[k]["value"], prompted[k]["value"])
                  for k in ("tools end-to-end", "pirate")}
        out.append({"target": f"{way}: both cycles >= {100 * TARGET_SHARE:.0f}% of the prompted "
                              f"base model, without a prompt",
                    "measured": ", ".join(f"{k} {100 * v:.0f}%" if v is not None else
                                          f"{k} (prompted base scores 0)"
                                          for k, v in shares.items()),
                    "pass": all(v is not None and v >= TARGET_SHARE for v in shares.values())})
    return out


def _rows(result) -> list[tuple[str, dict, str]]:
    rows = [("base model", result["references"]["base"], ""),
            ("base model with each cycle's prompt", result["references"]["prompted base"], ""),
            ("the tool prompt baked", result["tool state"]["scores"],
             f"{result['tool state']['seconds']:.0f} s")]
    for way in WAYS:
        w = result["ways"][way]
        rows.append((f"+ pirate, taught by: {way}", w["scores"],
                     f"KL reduction {100 * w['kl_reduction']:.1f}%, {w['bake_seconds']:.0f} s"))
    return rows


KEYS = ("tool_use", "tools end-to-end", "pirate")


def report(result) -> str:
    lines = [harness.table(["model (held-out, no prompt)", *KEYS, "bake"],
                           [[name, *[f"{s[k]['value']:.3f} ± {s[k]['se'] or 0:.3f}"
                                     for k in KEYS], extra]
                            for name, s, extra in _rows(result)]), ""]
    lines.append(harness.checks_table(result["checks"]))
    return "\n".join(lines)


def markdown(result) -> str:
    mach = result["machine"]
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}", "", *harness.checks_markdown(result["checks"]), "",
             "| model (held-out, no prompt) | " + " | ".join(KEYS) + " | bake |",
             "|---|" + "---:|" * len(KEYS) + "---|"]
    for name, s, extra in _rows(result):
        lines.append(f"| {name} | " + " | ".join(
            f"{s[k]['value']:.3f} ± {s[k]['se'] or 0:.3f}" for k in KEYS) + f" | {extra} |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(result)
    fig, axes = plt.subplots(1, len(KEYS), figsize=(5 * len(KEYS), 3.8))
    for ax, key in zip(axes, KEYS):
        names = [name for name, _, _ in rows]
        values = [s[key]["value"] for _, s, _ in rows]
        errors = [s[key]["se"] or 0 for _, s, _ in rows]
        ax.barh(range(len(rows)), values, xerr=errors, color="tab:blue")
        ax.set_yticks(range(len(rows)), names if key == KEYS[0] else [""] * len(rows),
                      fontsize=7)
        ax.invert_yaxis()
        ax.set(title=key, xlabel="held-out score, no prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
