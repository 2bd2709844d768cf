"""Timing, memory and reporting helpers shared by the benchmark suites.

Numbers are measured, never derived: times are medians over repeats after warm-up, taken in
turns when several contenders are compared; memory is the process's real peak resident set
(Linux VmHWM, reset before each measurement).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _return_freed_memory() -> None:
    """Make glibc hand every block of 1 MiB or more back to the OS when it is freed.

    By default glibc raises its mmap threshold after frees (up to 32 MiB) and keeps freed heap
    memory resident for reuse, so a buffer allocated into that memory would not show in the
    resident set and the peak-memory measurement would read 0.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 1 << 20)



def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Wall-clock seconds of fn(): median, min, max and every sample."""
    return timeit_side_by_side({"fn": fn}, repeats, warmup)["fn"]


def timeit_side_by_side(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, dict]:
    """Times several functions in turns (a, b, c, a, b, c, ...), so that a slow spell of a
    shared machine, or its warming up, falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(x), "min": min(x), "max": max(x), "samples": x}
            for name, x in samples.items()}


def in_child(module: str, call: str, args) -> object:
    """The JSON value of ``call``, a Python expression over ``args`` (any JSON value) and ``log``,
    evaluated in a new process that has imported the bench module ``module``.

    Timings run there: ``can_measure_memory`` switches the C allocator for the rest of the
    process, and under that switch freeing and touching memory again costs page faults (the
    bake suite's loops ran 13-25% slower, unevenly). A child starts with glibc's defaults, as a
    user's process does, whatever suite ran before."""
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        script = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
                  f"import {module}; args = json.loads(sys.argv[2]); "
                  "log = lambda text: print(text, flush=True); "
                  f"open(sys.argv[3], 'w').write(json.dumps({call}))")
        subprocess.run([sys.executable, "-c", script, here, json.dumps(args), out], check=True)
        with open(out) as f:
            return json.load(f)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def can_measure_memory() -> bool:
    """True on Linux; switches glibc to returning freed memory (only suites measuring memory)."""
    _return_freed_memory()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory while fn() runs, above what was resident before it (Linux only).

    Large tensors are mmap-ed by the allocator and unmapped when freed, so the resident set
    tracks tensor memory; anything fn() keeps alive (e.g. a .grad) counts.
    """
    if not can_measure_memory():
        return None
    before = _status_bytes("VmRSS")
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a plain tensor copy (read + write), as the machine's memory yardstick."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * nbytes / t["median"]


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                        re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_text(path: Path, text: str) -> None:
    """Written to a temporary name, then renamed: an interrupted run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes may write one file
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def verdict(passed: bool | None) -> str:
    """A check's result column: "pass", "MISS", or "info" for a line that is no target."""
    return "info" if passed is None else "pass" if passed else "MISS"


def checks_table(checks: list[dict]) -> str:
    """A suite's checks (``target``, ``measured``, ``pass``) as a console table."""
    return table(["target", "measured", "result"],
                 [[c["target"], c["measured"], verdict(c["pass"])] for c in checks])


def checks_markdown(checks: list[dict]) -> list[str]:
    """A suite's checks as the lines of a markdown table."""
    return ["| target | measured | result |", "|---|---|---|"] + [
        f"| {c['target']} | {c['measured']} | {verdict(c['pass'])} |" for c in checks]


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda items: "  ".join(c.rjust(w) for c, w in zip(items, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
