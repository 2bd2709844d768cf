"""``promptbake pursue``: prompt pursuit (Eq. 4) from a bake."""

from __future__ import annotations

from promptbake.artifact import load_baked
from promptbake.cli.arguments import Help, score_line
from promptbake.config import BakeConfig
from promptbake.formatting import pm
from promptbake.orchestrate import pursue
from promptbake.tasks import load_task


def register(commands) -> None:
    _add_pursue(commands)


def _add_pursue(commands) -> None:
    p = commands.add_parser(
        "pursue", help="prompt pursuit: bake the prompt again into the baked model",
        description="Prompt pursuit (Eq. 4): each round's teacher is the current baked model "
                    "with the prompt, its student the same model without it, on fresh "
                    "trajectories. Stops when the tracked score (a task's, or the KL to the "
                    "prompted base model) improves by less than --threshold for --patience "
                    "rounds, or after --rounds. Keeps the best round as one stacked adapter.",
        formatter_class=Help)
    p.add_argument("dir", help="a baked directory (round 0)")
    p.add_argument("--out", required=True, help="output directory for the pursued model")
    p.add_argument("--rounds", type=int, default=3, help="most rounds after the first bake")
    p.add_argument("--task", default=None,
                   help="task to track (a shipped name or a .jsonl file); default: the KL to "
                        "the prompted base model")
    p.add_argument("--limit", type=int, default=None, help="first N items of --task")
    p.add_argument("--threshold", type=float, default=0.02,
                   help="relative improvement under which a round counts as flat")
    p.add_argument("--patience", type=int, default=1, help="flat rounds in a row to stop")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round "
                   "(default: the first bake's settings)")
    p.add_argument("--epochs", type=float, default=None, help="epochs per round")
    p.add_argument("--contexts", default=None,
                   help="training contexts (default: those of the first bake)")
    p.add_argument("--model", default=None, help="base model directory, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace a previous result in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_pursue)


def _pursue(args) -> int:
    baked = load_baked(args.dir, model=args.model)
    config = None
    if args.steps is not None or args.epochs is not None:
        config = BakeConfig.from_manifest(baked.manifest)
        config.steps = args.steps if args.steps is not None else config.steps
        config.epochs = args.epochs if args.epochs is not None else config.epochs
    evaluator = load_task(args.task, limit=args.limit) if args.task else None
    result = pursue(baked, rounds=args.rounds, evaluator=evaluator, config=config,
                    contexts=args.contexts, threshold=args.threshold, patience=args.patience,
                    out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{'round':>5}  {'KL(base+u || model) /token':>27}  {result.tracked}")
    for r in result.rounds:
        kl = r.kl_to_prompted
        tracked = score_line(r.score) if r.score is not None else f"{r.metric:.4f}"
        best = "  <- kept" if r.round == result.best else ""
        print(f"{r.round:>5}  {pm(kl['per_token'], kl['per_token_se'], '>12.4f'):>27}  "
              f"{tracked}{best}")
    print(f"stopped: {result.stopped}; the best round ({result.best}) is in {args.out}")
    return 0
