"""Tool-sweep suite: how the tool bake's defaults (``orchestrate.tools.TOOL_DEFAULTS``) were
chosen.

The four computing tools' prompt on the default model, baked as ``bake_tools`` bakes it (the
same contexts: the shipped questions and the prompted model's own conversations with a result),
from a prompt bake's defaults (144 contexts x 2 samples), one setting changed at a time: the loss
weight of each response's first token (where the model decides between calling a tool and
answering), more training contexts with one sample each, and more epochs.
Every variant trains on the same trajectories where its sampling settings agree and is measured
on the same held-out samples. Per variant: the held-out KL reduction, and on the first 60
held-out tool items and 30 no-tool items (``tools.ToolUse``'s, never trained on) the probability
that the first answer token starts a call, and how many items a greedy decoder would call on.
The prompted base model (the teacher) gives the reference.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

import harness
from bake_sweep import variant
from promptbake import BakeConfig, contexts as contexts_mod, mc_kl, models, tools
from promptbake.framing import Framing
from promptbake.modeling import BASE
from promptbake.orchestrate.tools import bake_contexts, tool_specs
from promptbake.train import sample_trajectories

BAKED_TOOLS = "shipped:CALC,CONVERT,DAYS_BETWEEN,WEEKDAY"
VARIANTS = {
    "first token x1 (a prompt bake's default)": {"first_token_weight": 1.0},
    "first token x8": {"first_token_weight": 8.0},
    "first token x32": {"first_token_weight": 32.0},
    "2x contexts, 1 sample each, first token x8": {
        "first_token_weight": 8.0, "contexts": 2, "samples_per_context": 1},
    "the same, 8 epochs (the tool bake's defaults)": {
        "first_token_weight": 8.0, "contexts": 2, "samples_per_context": 1, "epochs": 8.0},
}
QUICK = list(VARIANTS)[:2]
TOOL_ITEMS, PLAIN_ITEMS = 60, 30


def run(args, log) -> dict:
    torch.set_num_threads(2)
    quick = args.quick
    base = BakeConfig(train_contexts=16, eval_contexts=8, epochs=1.0) if quick else BakeConfig()
    lm, tokenizer, _ = models.load(None)
    specs = tool_specs(BAKED_TOOLS)
    prompt = tools.render(specs, tokenizer)
    log("  the contexts bake_tools trains on (the prompted model's conversations included)")
    start = time.perf_counter()
    asked = [[{"role": "user", "content": r["user"]}]
             for r in tools.shipped.train_rows()[::8]] if quick else None  # a smoke run
    mixed, counts = bake_contexts(lm, tokenizer, prompt, specs, tools.shipped.registry(),
                                  asked, max_new_tokens=base.max_new_tokens)
    context_seconds = time.perf_counter() - start
    framing = Framing(tokenizer, prompt, base.framing)
    held_out = contexts_mod.for_bake(mixed, "held_out", base.eval_contexts)
    held_traj = sample_trajectories(lm, tokenizer, [framing.teacher_ids(c) for c in held_out],
                                    base, "none", seed=base.seed + 1, samples=1)
    before = mc_kl.kl_on(lm, framing, held_out, held_traj, {"b": BASE},
                         pad_id=tokenizer.pad_token_id)["b"]
    items = tools.shipped.test_items(specs)
    scale = 4 if quick else 1
    questions = {"tool": [i["prompt"] for i in items if i.get("expected")][:TOOL_ITEMS // scale],
                 "no tool": [i["prompt"] for i in items
                             if not i.get("expected")][:PLAIN_ITEMS // scale]}
    firsts = sorted({tokenizer(s.name, add_special_tokens=False).input_ids[0] for s in specs})
    teacher = {kind: call_probability(lm, framing.teacher_ids, qs, firsts)
               for kind, qs in questions.items()}
    rows, cache = [], {}
    for name in (QUICK if quick else VARIANTS):
        changes = dict(VARIANTS[name])
        config = dataclasses.replace(base, train_contexts=base.train_contexts *
                                     changes.pop("contexts", 1), **changes)
        log(f"  {name}")
        drawn = contexts_mod.for_bake(mixed, "train", config.train_contexts, config.seed)
        model, row = variant(lm, tokenizer, framing, drawn, config, cache,
                             (held_out, held_traj, before))
        calls = {kind: call_probability(model, framing.student_ids, qs, firsts)
                 for kind, qs in questions.items()}
        rows.append({"variant": name, "changes": VARIANTS[name],
                     "contexts": config.train_contexts, **row, "calls": calls})
        reduction, se = row["reduction"], row["reduction_se"]
        log(f"    KL reduction {100 * reduction:.1f}% ± {100 * se:.1f}%; tool items P(call) "
            f"{calls['tool']['p']:.3f}, greedy calls {calls['tool']['calls']}/"
            f"{calls['tool']['items']}")
        del model
    return {"suite": "tool-sweep", "machine": harness.machine(), "tools": BAKED_TOOLS,
            "defaults": dataclasses.asdict(base), "contexts": counts,
            "context_seconds": context_seconds, "before": before.to_dict(), "teacher": teacher,
            "rows": rows}


def call_probability(model, ids_of, questions: list[str], firsts: list[int]) -> dict:
    """Over ``questions`` (one user message each, framed by ``ids_of``): the mean probability
    that the first answer token starts a call (the first token of a tool's name), its standard
    error, and on how many items that token is the most likely one (a greedy decoder calls)."""
    probabilities, calls = [], 0
    with torch.no_grad():
        for question in questions:
            ids = ids_of([{"role": "user", "content": question}])
            probs = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            probabilities.append(float(probs[firsts].sum()))
            calls += int(probs.argmax()) in firsts
    se = statistics.stdev(probabilities) / len(probabilities) ** 0.5 \
        if len(probabilities) > 1 else None
    return {"p": statistics.mean(probabilities), "se": se, "calls": calls,
            "items": len(questions)}


def _calls(c: dict) -> str:
    return f"{c['p']:.3f} ± {c['se'] or 0:.3f}, {c['calls']}/{c['items']}"


def report(result) -> str:
    teacher = result["teacher"]
    body = [[r["variant"], r["contexts"], r["trajectories"], r["steps"],
             "(shared)" if r["sample_seconds"] < 1 else f"{r['sample_seconds']:.0f}",
             f"{r['train_seconds']:.0f}",
             f"{100 * r['reduction']:.1f}% ± {100 * r['reduction_se']:.1f}%",
             _calls(r["calls"]["tool"]), _calls(r["calls"]["no tool"])]
            for r in result["rows"]]
    body.append(["prompted model (the teacher)", "", "", "", "", "", "",
                 _calls(teacher["tool"]), _calls(teacher["no tool"])])
    return (f"KL(prompted || base) {result['before']['per_token']:.4f} nats/token on "
            f"{result['before']['sequences']} held-out samples\n" + harness.table(
                ["variant", "contexts", "traj", "steps", "sample s", "train s", "KL reduction",
                 "tool items: P(call), greedy calls", "no-tool items: P(call), calls"], body))


def markdown(result) -> str:
    teacher = result["teacher"]
    lines = [f"`{result['command']}` — {result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} threads, {result['machine']['date'][:10]}; "
             f"{result['tools']}", "",
             "| variant | contexts × samples | train s | held-out KL reduction | tool items: "
             "P(call), greedy calls | no-tool items: P(call), calls |",
             "|---|---:|---:|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['contexts']} × "
                     f"{r['trajectories'] // r['contexts']} | {r['train_seconds']:.0f} | "
                     f"{100 * r['reduction']:.1f}% ± {100 * r['reduction_se']:.1f}% | "
                     f"{_calls(r['calls']['tool'])} | {_calls(r['calls']['no tool'])} |")
    lines.append(f"| prompted model (the teacher) | | | | {_calls(teacher['tool'])} | "
                 f"{_calls(teacher['no tool'])} |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    names = [r["variant"] for r in rows]
    left.barh(names, [100 * r["reduction"] for r in rows],
              xerr=[100 * r["reduction_se"] for r in rows], color="tab:blue")
    left.axvline(90, color="k", ls="--", lw=0.8)
    left.set(xlabel="held-out KL reduction, %", xlim=(0, 100))
    right.barh(names, [r["calls"]["tool"]["calls"] for r in rows], color="tab:orange")
    right.axvline(result["teacher"]["tool"]["calls"], color="k", ls="--", lw=0.8,
                  label="prompted model")
    right.set(xlabel=f"greedy calls on {rows[0]['calls']['tool']['items']} held-out tool items")
    right.legend(fontsize=8)
    left.invert_yaxis()
    fig.suptitle("the tool bake, one change at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
