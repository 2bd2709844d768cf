"""The ``promptbake`` command: bake, chat, kl, contexts, evaluate, tasks, pursue, run, report,
drift, export, models, backends.

One module per group of commands, each command's parser beside its handler: ``bake``
(bake, chat, kl), ``contexts`` (contexts generate), ``evaluate`` (evaluate, tasks, report, drift), ``pursue``, ``run`` (a pipeline file), ``export``, ``info``
(models, backends). Bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

import promptbake
from promptbake.cli import bake, contexts, evaluate, export, info, pursue, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptbake",
        description="Bake a prompt into a LoRA update of a causal LM, so the model without the "
                    "prompt behaves as with it (Prompt Baking, arXiv 2409.13697).")
    parser.add_argument("--version", action="version",
                        version=f"promptbake {promptbake.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (bake, contexts, evaluate, pursue, run, export, info):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
        print(f"promptbake: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptbake: interrupted; a bake continues where it stopped with --resume",
              file=sys.stderr)
        return 130

