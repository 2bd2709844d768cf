"""Coverage suite: does a persona bake answer like its prompt on questions unlike its contexts?

An earlier evaluate run found the pirate bake worse than its prompt on arithmetic: it opened
with "Aye" where the prompted model answered the sum. Its training contexts were then the general
questions alone (``contexts.builtin(kinds=("general",))``), with almost no arithmetic; the shipped
set now adds short task-like ones (sums, facts, pick-one questions, classification, format and
code requests). Here the README's pirate is baked on each (the shipped one is the evaluate
suite's cached default bake), and on the shipped set with twice the default training contexts
(``--train-contexts 288``); each is scored greedily, without the prompt, on 120 arithmetic
questions that are neither task items nor shipped contexts (in any wording), beside the base and
the prompted base model: accuracy, answers that open with the persona's "Aye", answers that run
out of tokens, and each bake against the prompted model, paired by item.
"""

from __future__ import annotations

import dataclasses

import harness
from common import CACHE, PIRATE, answer_counts, cached_bake, pirate_config
from evaluate import arithmetic_contexts
from promptbake import contexts as contexts_mod, forgetting as fg, load_baked, reprompt
from promptbake.modeling import BAKED, BASE, PROMPTED
from promptbake.tasks import TASKS, Task

CELLS = {"base": (None, BASE), "prompted (base + u)": (None, PROMPTED),
         "baked, general contexts only": ("pirate-general", BAKED),
         "baked, shipped contexts (general + short)": ("pirate", BAKED),
         "baked, shipped contexts, twice the training contexts": ("pirate-2x", BAKED)}


def run(args, log) -> dict:
    dev_size = 24 if args.quick else 120
    shipped = contexts_mod.builtin_messages()
    dev = arithmetic_contexts(dev_size, seed=7, exclude=shipped)
    arithmetic = TASKS["arithmetic"]
    task = Task("arithmetic-dev", [
        {"id": f"dev-{i}", "prompt": q, "checks": [{"type": "number", "value": _answer(q)}]}
        for i, q in enumerate(dev)], max_new_tokens=arithmetic.max_new_tokens,
        until=arithmetic.until)
    # The general kind alone; the hash split gives it the shipped set's general train and
    # held-out parts.
    general = CACHE / "general-contexts.txt"
    harness.write_text(general, "\n".join(contexts_mod.builtin_messages(("general",))) + "\n")
    config = pirate_config(args.quick)
    suffix = "-quick" if args.quick else ""
    bakes = {"pirate": cached_bake(f"pirate{suffix}", PIRATE, config, log=log),
             "pirate-general": cached_bake(f"pirate-general{suffix}", PIRATE, config,
                                           contexts=general, log=log),
             # --train-contexts twice the default: more of the short kind in the bake
             "pirate-2x": cached_bake(f"pirate-2x{suffix}", PIRATE, dataclasses.replace(
                 config, train_contexts=2 * config.train_contexts), log=log)}
    models = {name: load_baked(made["path"]) for name, made in bakes.items()}
    scores = {}
    for label, (which, variant) in CELLS.items():
        log(f"  {label}")
        scores[label] = reprompt.score(models[which or "pirate"], task, variant)
    rows = {label: {"score": s.to_dict(), **answer_counts(s, task.max_new_tokens)}
            for label, s in scores.items()}
    prompted = scores["prompted (base + u)"]
    for label in list(CELLS)[2:]:
        change = fg.compare({"arithmetic": prompted}, {"arithmetic": scores[label]})
        rows[label]["vs_prompted"] = change.changes["arithmetic"].to_dict()
    return {"suite": "coverage", "machine": harness.machine(), "dev_questions": dev_size,
            "bakes": {n: {"path": str(m["path"]), "kl": models[n].manifest["kl"]}
                      for n, m in bakes.items()},
            "rows": rows}


def _answer(question: str) -> int:
    a, op, b = question.removeprefix("What is ").removesuffix("?").split()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def report(result) -> str:
    rows = [[label, f"{r['score']['value']:.3f} ± {r['score']['se'] or 0:.3f}",
             _vs(r), r["start_with_aye"], r["out_of_tokens"]]
            for label, r in result["rows"].items()]
    return harness.table(["model, no prompt unless prompted", "accuracy", "against prompted",
                          "open with Aye", "out of tokens"], rows) + \
        f"\n({result['dev_questions']} arithmetic questions, none trained on)"


def _vs(row: dict) -> str:
    change = row.get("vs_prompted")
    if change is None:
        return "—"
    return f"{100 * (change['relative'] or 0):+.0f}% (p {change['p_value']:.2g})"


def markdown(result) -> str:
    mach = result["machine"]
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}; {result['dev_questions']} arithmetic questions, none trained "
             f"on", "", "| model | accuracy | against prompted | open with Aye | out of tokens |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {r['score']['value']:.3f} ± {r['score']['se'] or 0:.3f} | {_vs(r)} "
              f"| {r['start_with_aye']} | {r['out_of_tokens']} |"
              for label, r in result["rows"].items()]
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["rows"])
    n = result["dev_questions"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(range(len(labels)), [result["rows"][x]["score"]["value"] for x in labels],
                yerr=[result["rows"][x]["score"]["se"] or 0 for x in labels], capsize=4,
                color=["#999", "#69c", "#c96", "#6a6", "#396"])
    axes[0].set(ylabel="arithmetic accuracy", title="answers, greedy")
    for ax in axes:
        ax.set_xticks(range(len(labels)), [x.replace(", ", ",\n") for x in labels], fontsize=8)
    width = 0.4
    for k, (key, name) in enumerate((("start_with_aye", "open with 'Aye'"),
                                     ("out_of_tokens", "run out of tokens"))):
        axes[1].bar([i + (k - 0.5) * width for i in range(len(labels))],
                    [result["rows"][x][key] / n for x in labels], width, label=name)
    axes[1].set(ylabel="share of answers", title="how the answers go")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
