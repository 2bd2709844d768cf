"""``promptbake models`` and ``backends``: what this machine has."""

from __future__ import annotations

import promptbake
from promptbake import models


def register(commands) -> None:
    _add_models(commands)
    _add_backends(commands)


def _add_models(commands) -> None:
    p = commands.add_parser("models", help="models available here",
                            description="List the embedded default model and its state.")
    p.set_defaults(run=_models)


def _models(args) -> int:
    for info in models.available():
        state = "ready    " if info.ready else "not ready"
        print(f"{info.name}  {state}  {info.detail}")
    print("any local Hugging Face causal-LM directory also works: --model DIR")
    return 0


def _add_backends(commands) -> None:
    p = commands.add_parser(
        "backends", help="list the kernel backends (cpp, triton, torch) and why one is missing",
        description="List the backends that run promptbake's kernels here. The default is chosen "
                    "by the tensors' device; set PROMPTBAKE_BACKEND=cpp|triton|torch to force one.")
    p.set_defaults(run=_backends)


def _backends(args) -> int:
    rows = promptbake.backends()
    width = max(len(name) for name in rows)
    for name, info in rows.items():
        state = "available  " if info.available else "unavailable"
        print(f"{name:<{width}}  {state}  {info.detail}")
    return 0
