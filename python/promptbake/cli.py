"""The ``promptbake`` command."""

from __future__ import annotations

import argparse
import sys

import promptbake


def _backends(args: argparse.Namespace) -> int:
    rows = promptbake.backends()
    width = max(len(name) for name in rows)
    for name, info in rows.items():
        state = "available  " if info.available else "unavailable"
        print(f"{name:<{width}}  {state}  {info.detail}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptbake",
        description="Bake a prompt into a LoRA update of a causal LM (Prompt Baking, "
                    "arXiv 2409.13697).")
    parser.add_argument("--version", action="version", version=f"promptbake {promptbake.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = commands.add_parser(
        "backends", help="list the kernel backends (cpp, triton, torch) and why one is missing",
        description="List the backends that run promptbake's kernels here. The default is chosen "
                    "by the tensors' device; set PROMPTBAKE_BACKEND=cpp|triton|torch to force one.")
    p.set_defaults(run=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
