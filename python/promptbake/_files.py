"""Writing files so that an interrupted run never leaves a half-written one.

Everything is written under a temporary name in the same directory and renamed into place; a
full disk becomes an error that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator


def _disk_full(path: Path, err: OSError) -> OSError:
    return OSError(errno.ENOSPC, f"out of disk space while writing {path}: nothing was left "
                   f"half-written; free some space and run the command again "
                   f"(a bake continues where it stopped with --resume)") if err.errno == errno.ENOSPC else err


@contextlib.contextmanager
def _temporary(path: Path, is_dir: bool) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except OSError as err:
        _remove(tmp)
        raise _disk_full(path, err) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sync(path: Path) -> None:
    """Flushes a file, or a directory's entries, to the disk: a rename is only as durable as
    what it points at."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp)`` to write a file at a temporary path, then renames it to ``path``."""
    with _temporary(path, is_dir=False) as tmp:
        writer(tmp)
        _sync(tmp)
        os.replace(tmp, path)
        _sync(path.parent)


def write_text(path: Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def to_json(value, **options) -> str:
    """JSON text, with NaN and infinities as null (JSON has no such numbers)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **options)


def replace_dir(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp_dir)`` to fill a fresh directory, then swaps it in for ``path``."""
    path = Path(path)
    with _temporary(path, is_dir=True) as tmp:
        writer(tmp)
        for item in tmp.iterdir():
            if item.is_file():
                _sync(item)
        _sync(tmp)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)


def write_into(directory: Path, writer: Callable[[Path], None],
               announce: Callable[[list[str]], None] = lambda names: None) -> list[str]:
    """Calls ``writer(tmp_dir)``; the files it wrote then replace those of the same names in
    ``directory``, one atomic rename each, after ``announce(names)``. Returns the names."""
    directory = Path(directory)
    with _temporary(directory / ".staging", is_dir=True) as tmp:
        writer(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        announce(names)
        for name in names:
            _sync(tmp / name)
            os.replace(tmp / name, directory / name)
        _sync(directory)
        _remove(tmp)
    return names


_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+$")


def remove_temporaries(directory: Path) -> None:
    """Removes what an interrupted write left in ``directory`` (and one level below): the
    ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries that only this module creates."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for parent in [directory] + [d for d in directory.iterdir() if d.is_dir()
                                 and not _LEFTOVER.match(d.name)]:
        for item in parent.iterdir():
            if _LEFTOVER.match(item.name):
                _remove(item)
