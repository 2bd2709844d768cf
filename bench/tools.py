"""Tools suite: the shipped computing tools baked into the default model, measured.

1. What the tool prompt does first (a bake has nothing to recover from a prompt that does not
   help): the base model and the model prompted with the rendered tools (system message with the
   documentation, demonstration turns with executed results), on every held-out item, greedy,
   for the five shipped tools and for the four computing ones (CALC, CONVERT, DAYS_BETWEEN,
   WEEKDAY). The four are baked: on country questions the base model already answers and the
   prompt makes it call instead (``bench/tool_renderings.py`` compares renderings).
2. ``promptbake bake --tools shipped:CALC,CONVERT,DAYS_BETWEEN,WEEKDAY`` with the defaults.
3. The re-prompt matrix (base, base + tool prompt, baked, baked + prompt) on end-to-end
   accuracy, call accuracy and over-calling, with paired errors; how much of the prompt's
   end-to-end gain the bake recovers (stated only where the gain is significant).
4. The task suite's forgetting gate against the base model and against the prompted one
   (``beyond_prompt``), on the first ``--limit`` items of each task.
5. Serving: prompt tokens removed from every request and time to first token (prefill of the
   prompt and question, batch 1), baked (merged) against prompted, side by side.

Targets: the bake recovers >= 80% of the prompt's end-to-end gain; over-calling on no-tool items
at most the prompted model's + 5 points; held-out KL reduction >= 90%; no task damaged beyond
the prompt's own effect; time to first token baked <= 0.6 x prompted.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

import harness
from common import cached_bake
from evaluate import Parts
from promptbake import load_baked, reprompt, tools
from promptbake.export import merge
from promptbake.forgetting import check_suite
from promptbake.framing import Framing
from promptbake.modeling import BASE
from promptbake.orchestrate.tools import bake_tools, tool_config, tool_specs
from promptbake.stats import paired_test
from promptbake.tasks import Score, load_task, shipped

BAKED_TOOLS = "shipped:CALC,CONVERT,DAYS_BETWEEN,WEEKDAY"
TARGET_RECOVERY = 0.80
TARGET_OVER_CALLING = 0.05
TARGET_REDUCTION = 0.90
TARGET_TTFT = 0.6
MEASURES = ("end_to_end", "call_accuracy", "over_calling")


def run(args, log) -> dict:
    torch.set_num_threads(2)
    quick = args.quick
    config = tool_config(train_contexts=16, eval_contexts=8, epochs=1.0) if quick else \
        tool_config()
    # Held-out items scored: the first 96 of the interleaved tool and no-tool items (192 for the
    # prompt's own effect), 30 per task of the suite: a full run in about an hour on 2 cores.
    limit = 24 if quick else 96
    suite_limit = 8 if quick else 30
    timings = {}

    def make(out, overwrite):
        start = time.perf_counter()
        bake_tools(BAKED_TOOLS, config=config, out=out, overwrite=overwrite)
        (out / "bench-seconds.json").write_text(json.dumps(time.perf_counter() - start))

    log(f"  the tool bake ({BAKED_TOOLS})")
    made = cached_bake("tools-quick" if quick else "tools", bake_key(), config, log=log,
                       make=make)
    baked = load_baked(made["path"])
    bake_seconds = json.loads((Path(made["path"]) / "bench-seconds.json").read_text())
    parts = Parts(baked, {"quick": quick, "suite": "tools", "limit": limit}, log)
    prompt = baked.prompt
    specs = tool_specs(BAKED_TOOLS)
    five = tool_specs("shipped")

    log("  1. the tool prompts on the base model: five tools, and the four computing ones")
    every = tools.ToolUse(specs=five).head(limit and 2 * limit)
    effect = {}
    for name, used in (("five tools", five), ("four computing tools", specs)):
        items = [i for i in every.items if not i["expected"]
                 or i["expected"][0]["name"] in {s.name for s in used}]
        evaluator = tools.ToolUse(specs=used, items=items)
        rendered = tools.render(used, baked.tokenizer)
        cells = {cell: Score(**parts.get(
            f"tools-effect-{name}-{cell}", lambda cell=cell, evaluator=evaluator,
            rendered=rendered: _score_base(baked, evaluator, rendered if cell == "prompted"
                                           else None).to_dict(items=True),
            base_only=True, items=items, prompt=rendered if cell == "prompted" else None))
            for cell in ("base", "prompted")}
        effect[name] = {"items": len(items), **_compare(cells["base"], cells["prompted"])}

    log("  2-3. the re-prompt matrix of the baked tools")
    evaluator = tools.ToolUse(specs=specs).head(limit)
    matrix = parts.matrix("tools-matrix", lambda: reprompt.reprompt_matrix(baked, evaluator),
                          items=evaluator.items)
    cells = {name: {m: s.to_dict() for m, s in tools.metrics(score).items()
                    if m in MEASURES} for name, score in matrix.cells.items()}
    gains = {name: _compare(matrix.cells["base"], matrix.cells[name])
             for name in ("prompted", "baked", "baked+prompt")}
    recovery = _recovery(matrix)

    log(f"  4. the task suite, {suite_limit} items per task: forgetting against base and "
        f"against the prompted model")
    suite = parts.get("tools-suite", lambda: check_suite(
        baked, [load_task(t, limit=suite_limit) for t in shipped()], say=log).to_dict(),
        limit=suite_limit)

    log("  5. serving: prompt tokens removed and time to first token")
    serving = _serving(baked, prompt, evaluator.items[:8], repeats=3 if quick else 9)
    timings["bake_seconds"] = bake_seconds
    result = {"suite": "tools", "machine": harness.machine(), "tools": BAKED_TOOLS,
              "config": baked.manifest["config"], "bake": {
                  "path": str(made["path"]), "seconds": bake_seconds,
                  "kl": baked.manifest["kl"], "tools": baked.manifest["tools"]["contexts"]},
              "prompt_effect": effect, "cells": cells, "gains": gains, "recovery": recovery,
              "reprompt": matrix.to_dict(), "forgetting": suite["forgetting"],
              "forgetting_vs_prompted": suite["forgetting_vs_prompted"],
              "suite_limit": suite_limit, "serving": serving, "parts_seconds": parts.seconds}
    result["checks"] = checks(result)
    return result


def bake_key() -> str:
    """What identifies the tool bake for the cache: the tools, their specs and the shipped
    training questions (a change to either is a different bake)."""
    data = json.dumps([[s.to_dict() for s in tool_specs(BAKED_TOOLS)],
                       tools.shipped.train_rows()], sort_keys=True)
    return f"tools:{BAKED_TOOLS}:{hashlib.sha256(data.encode()).hexdigest()[:16]}"


def _score_base(baked, evaluator, rendered):
    with BASE.active(baked.model):
        return evaluator(baked.model, baked.tokenizer, rendered,
                         framing=baked.framing.student)


def _compare(before, after) -> dict:
    """Each tool measure of two Scores: values, paired difference with its error and p."""
    out = {}
    a, b = tools.metrics(before), tools.metrics(after)
    for name in MEASURES:
        if name not in a or name not in b:
            continue
        x = {i["id"]: i["score"] for i in a[name].items}
        y = {i["id"]: i["score"] for i in b[name].items}
        pairs = [(x[k], y[k]) for k in x if k in y]
        diff, se, n = tools.paired(before, after)[name]
        out[name] = {"before": a[name].value, "after": b[name].value, "difference": diff,
                     "se": se, "n": n, "p": paired_test(pairs)[0]}
    return out


def _recovery(matrix) -> dict:
    """The share of the prompt's end-to-end gain the bake recovers, with a paired error; None
    when the prompt's gain is not significant (a ratio over noise says nothing)."""
    e2e = {name: tools.metrics(score)["end_to_end"] for name, score in matrix.cells.items()}
    effect = reprompt.prompt_effect(e2e["base"], e2e["prompted"])
    ratio, se = reprompt.recovery(e2e["base"], e2e["prompted"], e2e["baked"]) \
        if effect["significant"] else (None, None)
    return {"end_to_end": ratio, "se": se, "prompt_effect": effect}


def _serving(baked, prompt, items, repeats: int) -> dict:
    """Prompt tokens per request, and time to first token of the prompted model (base weights,
    tool prompt + question) and of the baked one (merged weights, question only), timed in
    turns, medians over repeats."""
    framing = Framing(baked.tokenizer, prompt, baked.framing.student)
    contexts = [[{"role": "user", "content": item["prompt"]}] for item in items]
    teacher = [framing.teacher_ids(c) for c in contexts]
    student = [framing.student_ids(c) for c in contexts]
    merged = merge(baked)
    base = baked.model.get_base_model()

    def prefill(model, prompts):
        def go():
            with torch.no_grad(), BASE.active(baked.model):
                for ids in prompts:
                    model(input_ids=torch.tensor([ids]), logits_to_keep=1)
        return go

    timed = harness.timeit_side_by_side({"prompted": prefill(base, teacher),
                                         "baked": prefill(merged, student)}, repeats)
    per = {name: t["median"] / len(items) for name, t in timed.items()}
    return {"prompt_tokens": statistics.mean(len(t) for t in teacher),
            "question_tokens": statistics.mean(len(s) for s in student),
            "tokens_removed": statistics.mean(len(t) - len(s) for t, s in zip(teacher, student)),
            "ttft_seconds": per, "ttft_ratio": per["baked"] / per["prompted"],
            "requests": len(items), "repeats": repeats}


def checks(result) -> list[dict]:
    rec, kl = result["recovery"], result["bake"]["kl"]
    over = result["cells"]
    damaged = result["forgetting_vs_prompted"]["damaged"]
    effect = rec["prompt_effect"]
    serving = result["serving"]
    return [
        {"target": f"the bake recovers >= {100 * TARGET_RECOVERY:.0f}% of the prompt's "
                   f"end-to-end gain",
         "measured": f"{100 * rec['end_to_end']:.0f}% ± {100 * (rec['se'] or 0):.0f}%"
                     if rec["end_to_end"] is not None else
                     f"no significant gain to recover (prompted - base "
                     f"{effect['difference']:+.3f} ± {effect['se'] or 0:.3f}, p "
                     f"{effect['p']:.2g})",
         "pass": rec["end_to_end"] is not None and rec["end_to_end"] >= TARGET_RECOVERY},
        {"target": f"over-calling baked <= prompted + {100 * TARGET_OVER_CALLING:.0f} points",
         "measured": f"baked {over['baked']['over_calling']['value']:.3f}, prompted "
                     f"{over['prompted']['over_calling']['value']:.3f}",
         "pass": over["baked"]["over_calling"]["value"] <=
         over["prompted"]["over_calling"]["value"] + TARGET_OVER_CALLING},
        {"target": f"held-out KL reduction >= {100 * TARGET_REDUCTION:.0f}%",
         "measured": f"{100 * kl['reduction']:.1f}% ± {100 * kl['reduction_se']:.1f}%",
         "pass": kl["reduction"] >= TARGET_REDUCTION},
        {"target": "no task damaged beyond the prompt's own effect",
         "measured": ", ".join(damaged) or "none", "pass": not damaged},
        {"target": f"time to first token baked <= {TARGET_TTFT:g} x prompted",
         "measured": f"{serving['ttft_ratio']:.2f} x ({1000 * serving['ttft_seconds']['baked']:.0f}"
                     f" vs {1000 * serving['ttft_seconds']['prompted']:.0f} ms; "
                     f"{serving['tokens_removed']:.0f} prompt tokens removed per request)",
         "pass": serving["ttft_ratio"] <= TARGET_TTFT},
    ]


def _row(name: str, cell: dict) -> list[str]:
    return [name] + [f"{cell[m]['value']:.3f} ± {cell[m]['se'] or 0:.3f}" if m in cell else "—"
                     for m in MEASURES]


def report(result) -> str:
    lines = [f"baked: {result['tools']} ({result['bake']['seconds']:.0f} s, "
             f"{result['bake']['tools']['questions']} questions and "
             f"{result['bake']['tools']['with_results']} conversations with a result)", "",
             "the tool prompts on the base model (prompted - base, paired):"]
    for name, e in result["prompt_effect"].items():
        lines.append(f"  {name} ({e['items']} items): " + ", ".join(
            f"{m} {v['before']:.3f} -> {v['after']:.3f} ({v['difference']:+.3f} ± "
            f"{v['se'] or 0:.3f}, p {v['p']:.2g})" for m, v in e.items() if m != "items"))
    lines += ["", harness.table(["model", *MEASURES],
                                [_row(n, c) for n, c in result["cells"].items()]), ""]
    for name, g in result["gains"].items():
        lines.append(f"  {name} - base: " + ", ".join(
            f"{m} {v['difference']:+.3f} ± {v['se'] or 0:.3f} (p {v['p']:.2g})"
            for m, v in g.items()))
    gate = result["forgetting"]
    lines += ["", f"forgetting ({result['suite_limit']} items per task): gate "
              f"{'pass' if gate['passed'] else 'FAIL'}; damaged beyond the prompt: "
              f"{', '.join(result['forgetting_vs_prompted']['damaged']) or 'none'}", ""]
    lines.append(harness.checks_table(result["checks"]))
    return "\n".join(lines)


def markdown(result) -> str:
    mach = result["machine"]
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}; baked: {result['tools']}", "",
             *harness.checks_markdown(result["checks"])]
    lines += ["", "| the prompt on the base model | items | end to end | call accuracy | "
                  "over-calling |", "|---|---:|---:|---:|---:|"]
    for name, e in result["prompt_effect"].items():
        lines.append(f"| {name} | {e['items']} | " + " | ".join(
            f"{e[m]['before']:.3f} → {e[m]['after']:.3f} (p {e[m]['p']:.2g})" if m in e else "—"
            for m in MEASURES) + " |")
    lines += ["", "| model | end to end | call accuracy | over-calling |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(_row(n, c)) + " |" for n, c in result["cells"].items()]
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(12, 3.8))
    names = list(result["cells"])
    for ax, measure in zip(axes, MEASURES):
        values = [result["cells"][n].get(measure, {}).get("value", 0) for n in names]
        errors = [result["cells"][n].get(measure, {}).get("se") or 0 for n in names]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4,
               color=["#999", "#69c", "#c96", "#396"])
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set(title=measure.replace("_", " "), ylim=(0, 1))
    fig.suptitle(f"tool use, held-out items: {result['tools']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

