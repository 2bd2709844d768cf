"""What a tool prompt does on the default model: each rendering of the shipped tools against the
model without a prompt, on the first held-out items (greedy, so the numbers repeat).

    python bench/tool_renderings.py [--limit 40] [--out DIR] [--only NAME ...]

Each rendering's Score (with every item) is saved in ``--out`` as it finishes and reused on the
next run. One thread: the machine is shared. Not a suite of python bench/ (it measures choices
made once, as bake_sweep.py does for the bake), and not a test: the slow test
``test_default_rendering_gains_on_the_default_model`` checks the chosen default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from promptbake import models, tools
from promptbake.tasks import Score
from promptbake.tools import Example, shipped

# name -> (render options or None for no prompt, ToolUse options); the results role of the
# rendering and of the evaluator's tool turns are the same. Besides render's options:
# no_call_examples (0: none, 2: one more than shipped) and instruction="named", the first
# version's instruction, which showed the first tool's call.
RENDERINGS = {
    "base, read as compact": (None, {"syntax": "compact"}),
    "base, read as json": (None, {"syntax": "json"}),
    "json, everything in the system message": (
        {"syntax": "json", "demonstrations": "system"}, {"syntax": "json", "results": "user"}),
    "json, demonstrations as turns": ({"syntax": "json"}, {"syntax": "json"}),
    "compact, everything in the system message": (
        {"syntax": "compact", "demonstrations": "system"},
        {"syntax": "compact", "results": "user"}),
    "compact, turns (the default)": ({"syntax": "compact"}, {"syntax": "compact"}),
    "compact, turns, results as user turns": (
        {"syntax": "compact", "results": "user"}, {"syntax": "compact", "results": "user"}),
    "compact, turns, instruction showing CALC(17 * 23)": (
        {"syntax": "compact", "instruction": "named"}, {"syntax": "compact"}),
    "compact, turns, no no-call demonstration": (
        {"syntax": "compact", "no_call_examples": 0}, {"syntax": "compact"}),
    "compact, turns, two no-call demonstrations": (
        {"syntax": "compact", "no_call_examples": 2}, {"syntax": "compact"}),
}
NAMED = ("You can use tools. To use one, reply with only the call, for example CALC(17 * 23); "
         "you then get its result and give the answer. If no tool is needed, just answer.")
SECOND_NO_CALL = Example("Give me a tip for learning to draw.", [], [],
                         "Practice every day: start with simple shapes and sketch the objects "
                         "around you.")


def prompt_for(specs, tokenizer, options: dict) -> list[dict]:
    """render(specs, tokenizer, **options), with the variations of RENDERINGS."""
    options = dict(options)
    no_call = options.pop("no_call_examples", 1)
    if options.get("instruction") == "named":
        options["instruction"] = NAMED
    if no_call == 0:
        specs = [dataclasses.replace(s, examples=[e for e in s.examples if e.calls])
                 for s in specs]
    elif no_call == 2:
        specs = [dataclasses.replace(s, examples=s.examples + [SECOND_NO_CALL]) if i == 0 else s
                 for i, s in enumerate(specs)]
    return tools.render(specs, tokenizer, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("measure-renderings"))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = models.load(None)
    specs = shipped.specs()
    scores = {}
    for name, (options, evaluation) in RENDERINGS.items():
        if args.only and name not in args.only:
            continue
        path = args.out / f"{name.replace(' ', '_').replace(',', '')}.json"
        if path.exists():
            scores[name] = _load(path)
            continue
        prompt = None if options is None else prompt_for(specs, tokenizer, options)
        evaluator = tools.ToolUse(specs, **evaluation)
        started = time.perf_counter()
        score = evaluator(model, tokenizer, prompt, limit=args.limit)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        path.write_text(json.dumps({**score.to_dict(items=True), "prompt": prompt}, indent=1))
        scores[name] = score
    print(table(scores))


def table(scores: dict[str, Score]) -> str:
    header = ("| rendering | call accuracy | end to end | over-calling | call vs base "
              "| end to end vs base | failures (tool items) |")
    rows = [header, "|---|---:|---:|---:|---:|---:|---|"]
    for name, score in scores.items():
        found = tools.metrics(score)
        base = scores.get("base, read as json" if "json" in name.split(",")[0] else
                          "base, read as compact")
        gains = tools.paired(base, score) if base is not None and base is not score else {}
        failures = {k.split(":")[1]: v.value for k, v in found.items()
                    if k.startswith("failure:") and v.value > 0}
        rows.append(f"| {name} | {_pm(found.get('call_accuracy'))} | {_pm(found.get('end_to_end'))} | "
                    f"{_pm(found.get('over_calling'))} | {_gain(gains.get('call_accuracy'))} | "
                    f"{_gain(gains.get('end_to_end'))} | "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(failures.items(),
                                                                   key=lambda kv: -kv[1])) + " |")
    return "\n".join(rows)


def _pm(score: Score | None) -> str:
    if score is None:
        return "—"
    return f"{score.value:.3f}" + ("" if score.se is None else f" ± {score.se:.3f}")


def _gain(found) -> str:
    if found is None:
        return "—"
    mean, se, _ = found
    return f"{mean:+.3f}" + ("" if se is None else f" ± {se:.3f}")


def _load(path: Path) -> Score:
    data = json.loads(path.read_text())
    return Score(data["task"], data["metric"], data["value"], data["se"], data["n"],
                 data["chance"], data["items"])


if __name__ == "__main__":
    main()
