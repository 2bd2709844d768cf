"""Writing files so that an interrupted run never leaves a half-written one.

Everything is written under a temporary name in the same directory and renamed into place; a
full disk becomes an error that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
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


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp)`` to write a file at a temporary path, then renames it to ``path``."""
    with _temporary(path, is_dir=False) as tmp:
        writer(tmp)
        os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp_dir)`` to fill a fresh directory, then swaps it in for ``path``."""
    path = Path(path)
    with _temporary(path, is_dir=True) as tmp:
        writer(tmp)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
