"""``promptbake run``: a pipeline file (the engine's cycles, then report and export)."""

from __future__ import annotations

import sys

from promptbake import pipeline
from promptbake.cli.arguments import Help


def register(commands) -> None:
    p = commands.add_parser(
        "run", help="run a pipeline file: the baking engine, then report and export",
        description="Runs a pipeline file (TOML): the baking engine over its cycles (a tool "
                    "set, a persona, a prompt with a task: each round proposes prompts, "
                    "scores them on the cycle's dev split, bakes the winner on top of the "
                    "current model and measures every cycle's held-out split; a cycle that "
                    "stops gaining switches to the next), then the report and export stages. "
                    "Each stage writes OUT/<stage>/ with a stage.json; a rerun skips finished "
                    "stages whose settings and input files are unchanged, and the engine "
                    "resumes after its last finished round. Engine settings ([engine]): "
                    "max_rounds, threshold, patience, proposals, proposer (a model directory), "
                    "edits, pursuit_rounds, survive, rerun_fallen, on_error (continue|stop), "
                    "teacher (current|base: the model that reads a round's prompt when it is "
                    "baked), rehearse (per earlier-baked cycle, its contexts added to a bake "
                    "as a share of the bake's, taught by its own prompt), proposal_tokens, "
                    "seed. `promptbake run --example` prints the shipped "
                    "example (the shipped tools and the pirate persona on the default model).",
        formatter_class=Help)
    p.add_argument("file", nargs="?", help="the pipeline file (TOML)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (which stages run, resume or are up to date) and stop")
    p.add_argument("--example", action="store_true", help="print the example pipeline file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def _run(args) -> int:
    if args.example:
        sys.stdout.write(pipeline.example())
        return 0
    if args.file is None:
        raise ValueError("name a pipeline file (promptbake run --example prints one)")
    loaded = pipeline.load(args.file)
    pipeline.run(loaded, dry_run=args.dry_run, progress=not args.quiet,
                 say=lambda line: print(line, flush=True))
    return 0
