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
import tempfile
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
    remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except OSError as err:
        remove(tmp)
        raise _disk_full(path, err) from err
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Removes a file or a directory tree; nothing if it is not there."""
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


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def _ordinary_permissions(path: Path) -> None:
    """Gives ``path`` (and what is under it) the permissions ``open()`` and ``mkdir()`` would:
    some writers (safetensors) create their files 0600, which a serving process running as
    another user could not read."""
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp)`` to write a file at a temporary path, then renames it to ``path``
    (with the permissions an ordinary ``open()`` gives, whatever the writer chose)."""
    with _temporary(path, is_dir=False) as tmp:
        writer(tmp)
        _ordinary_permissions(tmp)
        _sync(tmp)
        os.replace(tmp, path)
        _sync(path.parent)


def write_text(path: Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_lines(text: str, source: str, error: type[Exception] = ValueError) -> list[dict]:
    """The JSON objects of a JSON-lines text, blank lines skipped; a line that is not a JSON
    object raises ``error`` naming ``source`` and the line."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise error(f"{source}, line {number}: not JSON ({err})") from err
        if not isinstance(item, dict):
            raise error(f"{source}, line {number}: an item must be a JSON object")
        items.append(item)
    return items


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


def replace_dir(path: Path, writer: Callable[[Path], None], *, kind: str | None = None) -> None:
    """Calls ``writer(tmp_dir)`` to fill a fresh directory, then swaps it in for ``path``.

    With ``kind``, the directory also gets a marker naming its kind and every file the writer
    made, so that a later ``check_output(..., overwrite=True)`` knows it may replace them.
    """
    path = Path(path)
    with _temporary(path, is_dir=True) as tmp:
        writer(tmp)
        if kind is not None:
            names = sorted(p.name for p in tmp.iterdir())
            (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": names}, indent=1))
        _ordinary_permissions(tmp)
        for item in tmp.iterdir():
            if item.is_file():
                _sync(item)
        _sync(tmp)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)


def write_into(directory: Path, writer: Callable[[Path], None],
               announce: Callable[[list[str]], None] = lambda names: None) -> list[str]:
    """Calls ``writer(tmp_dir)``; the files it wrote then replace those of the same names in
    ``directory``, one atomic rename each, after ``announce(names)``. Returns the names."""
    directory = Path(directory)
    with _temporary(directory / ".staging", is_dir=True) as tmp:
        writer(tmp)
        _ordinary_permissions(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        announce(names)
        for name in names:
            _sync(tmp / name)
            os.replace(tmp / name, directory / name)
        _sync(directory)
        remove(tmp)
    return names


# -- directories promptbake owns ---------------------------------------------------------------

MARKER = ".promptbake.json"  # in every directory promptbake writes: what it is, which files
MODEL_DIRS = ("merged", "onnx", "pruned", "gguf")  # whole-directory exports, which may replace
# each other


def read_marker(path: Path) -> dict | None:
    """The marker of a directory promptbake wrote, or None (no marker, or not readable)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marked_files(path: Path, marker: dict) -> list[str]:
    """The names ``marker`` (read from ``path``) lists as promptbake's, each checked to be one
    entry of ``path`` itself: a marker naming ``../x`` or ``/x`` was not written by promptbake, and
    nothing it names is ever removed."""
    names = marker.get("files", [])
    bad = [n for n in names if not isinstance(n, str) or n in ("", ".", "..")
           or Path(n).name != n or "/" in n or "\\" in n]
    if not isinstance(names, list) or bad:
        raise ValueError(f"the marker {Path(path) / MARKER} lists {bad or names!r}, which are not "
                         f"files of that directory: promptbake did not write it; remove or move "
                         f"the directory yourself")
    return names


def check_writable(path: Path) -> None:
    """Raises an OSError naming the directory when nothing can be created in ``path`` (or, where
    it does not exist yet, in its nearest existing parent): found before the long work starts,
    not after it. Probes with a real file, since permission bits do not tell a read-only mount
    or root's privileges."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise OSError(errno.ENOTDIR, f"{path} is a file, not a directory: choose another --out")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".promptbake-probe-", dir=path)
    except OSError as err:
        raise OSError(err.errno, f"cannot write to {path} ({err.strerror}): choose a writable "
                                 f"--out, or fix the directory's permissions") from err
    os.close(descriptor)
    os.unlink(probe)


def check_output(out: Path, *, overwrite: bool, kinds: tuple[str, ...] = MODEL_DIRS,
                 sources: tuple = ()) -> Path:
    """Checks, before any work, that a whole directory may be written at ``out``; writes nothing.

    ``out`` may be new, empty, or a directory promptbake wrote as one of ``kinds`` and holding
    nothing else (replaced only with ``overwrite``). Refused: a directory with any file
    promptbake did not write, a bake, and an ``out`` that is one of ``sources`` (what the output
    is made from), lies inside one or contains one, since replacing it would delete the source.
    """
    out = Path(out).expanduser()
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link: pass the directory it points to")
    target = out.resolve()
    for source in sources:
        if source is None:
            continue
        source = Path(source).expanduser().resolve()
        if target == source or source in target.parents:
            raise ValueError(f"--out {out} is inside {source}, the directory it is made from: "
                             f"choose an --out outside it")
        if target in source.parents:
            raise ValueError(f"--out {out} contains {source}, the directory it is made from; "
                             f"replacing it would delete that: choose another --out")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file: choose a directory")
        names = {p.name for p in out.iterdir()}
        if names:
            marker = read_marker(out)
            if marker is None or marker.get("kind") not in kinds:
                what = "a bake" if marker is not None and "identity" in marker else \
                    "files promptbake did not write"
                raise ValueError(f"--out {out} holds {what}; refusing to replace it: choose "
                                 f"another --out")
            foreign = sorted(names - set(marked_files(out, marker)) - {MARKER})
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise ValueError(f"--out {out} holds files promptbake did not write ({shown}) "
                                 f"beside an earlier export; refusing to replace it: move them "
                                 f"away or choose another --out")
            if not overwrite:
                raise ValueError(f"--out {out} holds an earlier {marker['kind']} export: pass "
                                 f"--overwrite to replace it, or choose another --out")
    check_writable(out.absolute().parent)  # the new directory is made there and renamed
    return out


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
                remove(item)
