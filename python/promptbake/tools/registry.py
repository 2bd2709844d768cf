"""Running tools: only registered ones, with checked arguments, a time limit and a size limit.

A tool is a ToolSpec and a Python function called with the call's arguments as keywords. The
function returns text (or a JSON value, which is written as JSON) or raises ``ToolError`` for a
bad request; ``Registry.run`` never raises: an unknown tool, arguments the schema refuses, an
exception, a timeout or an oversized output all come back as a ``ToolResult`` whose content
says what happened, which is what the model sees in its tool turn.

Isolation: ``thread`` (the default) runs the function in a daemon thread and stops waiting at
the timeout; Python cannot stop a thread, so a function that never returns keeps its thread
(the shipped tools bound their own work and finish in microseconds). ``process`` runs each
call in a child process that is killed at the timeout, for functions you do not trust to end;
it forks, so the function's result must be picklable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable

from promptbake.tools import schema
from promptbake.tools.calls import Call
from promptbake.tools.spec import ToolSpec

log = logging.getLogger("promptbake")

ISOLATIONS = ("thread", "process")


class ToolError(Exception):
    """Raised by a tool for a request it cannot serve; the message goes back to the model."""


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call returned: ``content`` is the text the model sees (the output, or a line
    starting with ``error:``); ``ok`` is false for any error."""

    name: str
    content: str
    ok: bool
    truncated: bool = False
    seconds: float = 0.0


class Registry:
    """The tools that may run. ``timeout`` in seconds per call; outputs longer than
    ``max_chars`` are cut and marked."""

    def __init__(self, *, timeout: float = 5.0, max_chars: int = 2000,
                 isolation: str = "thread"):
        if not timeout > 0 or max_chars < 1:
            raise ValueError(f"timeout={timeout}, max_chars={max_chars}: both must be positive")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation={isolation!r}: choose one of {', '.join(ISOLATIONS)}")
        self.timeout, self.max_chars, self.isolation = timeout, max_chars, isolation
        self._tools: dict[str, tuple[ToolSpec, Callable]] = {}

    def register(self, spec: ToolSpec, function: Callable) -> Registry:
        """Adds a tool; refuses a name already registered. Returns the registry."""
        if not callable(function):
            raise TypeError(f"tool {spec.name!r}: {function!r} is not callable")
        if spec.name in self._tools:
            raise ValueError(f"tool {spec.name!r} is already registered: give yours another name")
        self._tools[spec.name] = (spec, function)
        return self

    @property
    def specs(self) -> list[ToolSpec]:
        return [spec for spec, _ in self._tools.values()]

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def run(self, call: Call) -> ToolResult:
        """The result of ``call``; never raises (see the module docstring)."""
        if call.name not in self._tools:
            known = ", ".join(self._tools) or "none"
            return ToolResult(call.name, f"error: unknown tool {call.name!r}; the tools are "
                                         f"{known}", ok=False)
        spec, function = self._tools[call.name]
        problems = schema.check_arguments(spec.parameters, call.arguments)
        if problems:
            return ToolResult(call.name, "error: " + "; ".join(p.message for p in problems),
                              ok=False)
        started = time.perf_counter()
        run = _in_process if self.isolation == "process" else _in_thread
        status, text = run(function, call.arguments, self.timeout)
        seconds = time.perf_counter() - started
        if status == "timeout":
            return ToolResult(call.name, f"error: {call.name} did not finish within "
                                         f"{self.timeout:g} s", ok=False, seconds=seconds)
        if status != "ok":
            return ToolResult(call.name, f"error: {text}", ok=False, seconds=seconds)
        truncated = len(text) > self.max_chars
        if truncated:
            text = (text[:self.max_chars] + f"\n[truncated: the output has {len(text)} "
                    f"characters; the first {self.max_chars} are shown]")
        return ToolResult(call.name, text, ok=True, truncated=truncated, seconds=seconds)


def as_text(value) -> str:
    """A tool's return value as the text the model sees: strings as they are, JSON otherwise."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _call(function: Callable, arguments: dict) -> tuple[str, str]:
    try:
        return "ok", as_text(function(**arguments))
    except ToolError as err:
        return "refused", str(err)
    except Exception as err:  # a tool's bug must not stop an evaluation
        log.debug("promptbake: tool %r raised", function, exc_info=True)
        return "failed", f"the tool failed: {type(err).__name__}: {err}"


def _in_thread(function: Callable, arguments: dict, timeout: float) -> tuple[str, str]:
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(_call(function, arguments)),
                              daemon=True, name="promptbake-tool")
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else ("timeout", "")


def _child(connection, function, arguments) -> None:
    connection.send(_call(function, arguments))
    connection.close()


def _in_process(function: Callable, arguments: dict, timeout: float) -> tuple[str, str]:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, arguments), daemon=True)
    child.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        return "timeout", ""
    except EOFError:  # the child died without answering (killed, out of memory)
        child.join()
        return "failed", f"the tool's process ended without a result (exit code {child.exitcode})"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
