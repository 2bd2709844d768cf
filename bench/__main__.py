"""promptbake benchmarks: ``python bench/ [--only NAME] [--quick]``.

Each suite measures promptbake against the alternatives side by side in one run, prints a table,
writes ``bench/results/<name>.json`` and ``bench/results/<name>.png``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

SUITES = {
    "divergence": "fused softmax divergence, forward + backward: promptbake vs eager torch "
                  "and torch.compile",
    "memory": "LM head + baking loss, forward + backward, frozen head: peak extra memory and "
              "time of eager torch, torch.compile, the unfused cpp path and linear_divergence "
              "at N x V x H = 4096 x 49152 x 576 and 2048 x 128256 x 2048, fp32 and bf16",
    "bake": "the README's persona baked into the default model: phases, MC-KL before and "
            "after, and promptbake's loop against a reference loop on the same trajectories",
    "scale": "the same bake on 1 process and on 2 gloo ranks, data parallel and FSDP2, on the "
             "default model and a config-built 1.1B Llama: phase times, bytes per collective "
             "per step, resident memory per rank, the 8-rank projection from those bytes",
    "sparse": "SparseLinear against dense F.linear on the default model's layer shapes at 50%, "
              "70%, 90% and 2:4 sparsity, batch 1 and 8, weights streamed from memory and in cache",
    "evaluate": "what a bake did: re-prompt matrices, forgetting across the task suite, persona "
                "drift over 30 turns, an arithmetic recipe's recovered gain, prompt pursuit",
    "infer": "the baked persona served every way promptbake exports it: torch with the prompt, "
             "torch baked, ONNX Runtime fp32, int8, int4 (LoRA beside, 8- or 4-bit head, "
             "int8 or fp32 compute; merged), "
             "pruned + int8 at three settings, GGUF q8_0 / q4_0; latency, size, retention",
    "coverage": "the persona bake off its contexts: arithmetic answered like the prompt? baked "
                "on the general contexts alone against the shipped ones (general + short)",
    "tools": "the shipped computing tools baked: the tool prompt's own effect, the re-prompt "
             "matrix on end-to-end and call accuracy and over-calling, forgetting, time to "
             "first token",
    "prompts": "the defaults on a panel of seven prompts of different kinds: held-out and "
               "off-distribution KL reduction, drift, the task suite against the prompted "
               "model; a domain and a persona prompt baked on generated contexts alone",
    "engine": "the example pipeline's engine (the computing tools and the pirate) on the "
              "default model against the user's own prompts baked the same way and against "
              "sequential baking at equal wall time: held-out scores against the prompted base "
              "model, the plateau rule, wall time by phase",
    "engine-teachers": "who teaches a bake on top of a bake: the pirate baked on the tool-baked "
                       "default model, taught by the current model, by the base model, and by "
                       "the base model with the tool contexts rehearsed; both cycles' held-out "
                       "scores against the prompted base model",
    "bake-sweep": "how the bake's defaults were chosen: one setting changed at a time, held-out "
                  "KL reduction and time of each",
    "tool-sweep": "how the tool bake's first-token weight was chosen: the four computing "
                  "tools baked with one setting changed at a time, held-out KL reduction and "
                  "the first answer token's call probability on held-out tool items",
    "prompt-sweep": "changes to the defaults measured on several prompts: twice the training (8 "
                    "epochs, or 288 contexts), or the default budget in twice the steps or at "
                    "another learning rate (--variant); held-out and off-distribution KL "
                    "reduction",
}
ON_DEMAND = ("engine", "engine-teachers", "bake-sweep", "prompt-sweep", "tool-sweep")  # long: run with --only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/", description="Run promptbake's benchmarks. Suites: " + "; ".join(
            f"{name}: {text}" for name, text in SUITES.items()))
    parser.add_argument("--only", metavar="NAME", action="append", choices=sorted(SUITES),
                        help="run only this suite (repeatable); default: all but the sweeps, "
                             "bake-sweep (~2 h on 2 cores), prompt-sweep (~1 h) and tool-sweep "
                             "(~1.25 h), engine (hours) and engine-teachers (~1 h)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and repeats: a smoke run in about a minute or two")
    parser.add_argument("--repeats", type=int, metavar="R",
                        help="timed repeats per measurement (default 7, or 3 with --quick)")
    parser.add_argument("--section", metavar="PART", action="append",
                        choices=("persona", "recipe", "pursuit"),
                        help="evaluate only: measure just this part (persona, recipe or pursuit; "
                             "repeatable) and save it for the next whole run, which reuses it; "
                             "two processes with one section each finish sooner on 2 cores")
    parser.add_argument("--variant", metavar="NAME", action="append",
                        help="prompt-sweep only: measure just this variant (repeatable; the names "
                             "of bench/prompt_sweep.py's VARIANTS, e.g. 'defaults'); default: "
                             "its SWEEP")
    parser.add_argument("--prompt", metavar="NAME", action="append",
                        help="prompt-sweep only: measure on just this prompt of the panel "
                             "(repeatable; the names of bench/prompts.py's PANEL, e.g. "
                             "'SQL (narrow domain)'); default: prompt_sweep.PROMPTS")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="directory for the JSON and PNG results (default: bench/results)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    for given, flag in ((args.variant, "--variant"), (args.prompt, "--prompt")):
        if given and args.only != ["prompt-sweep"]:
            parser.error(f"{flag} applies to the prompt-sweep suite: use it with --only "
                         "prompt-sweep")
    if args.section and args.only != ["evaluate"]:
        parser.error("--section applies to the evaluate suite: use it with --only evaluate")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    progress = logging.StreamHandler(sys.stderr)  # the library's progress lines (task items...)
    progress.setFormatter(logging.Formatter("      %(message)s"))
    logging.getLogger("promptbake").addHandler(progress)
    logging.getLogger("promptbake").setLevel(logging.INFO)
    for name in args.only or [n for n in SUITES if n not in ON_DEMAND]:
        suite = importlib.import_module(name.replace("-", "_"))
        log(f"[{name}] {SUITES[name]}")
        start = time.perf_counter()
        result = suite.run(args, log)
        if result is None:  # only some parts measured (--section): nothing complete to write
            continue
        result["quick"] = args.quick
        result["wall_seconds"] = time.perf_counter() - start
        # quoted as a shell needs it, so the command a table prints can be pasted back
        result["command"] = "python bench/ " + shlex.join(sys.argv[1:] if argv is None else argv)
        json_path = args.out / f"{name}.json"
        harness.write_json(json_path, result)
        png = args.out / f"{name}.png"
        tmp = png.with_name(png.stem + ".tmp.png")
        suite.plot(result, tmp)
        tmp.replace(png)
        if hasattr(suite, "markdown"):
            harness.write_text(args.out / f"{name}.md", suite.markdown(result) + "\n")
        print(f"\n== {name} ({result['wall_seconds']:.0f} s) ==")
        print(suite.report(result))
        print(f"wrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
