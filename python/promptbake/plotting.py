"""Figures as files: matplotlib without a screen, and PNGs written atomically.

    with plotting.figure(path, ncols=2, figsize=(10, 4)) as (fig, axes):
        axes[0][0].plot(...)

draws into a new figure and writes it to ``path`` (a temporary name, then a rename) when the
block ends without an error; the figure is closed either way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from promptbake import files

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: str | Path, *, nrows: int = 1, ncols: int = 1,
           figsize: tuple[float, float] = (6, 4)) -> Iterator[tuple[object, list]]:
    """A figure with a ``nrows`` x ``ncols`` grid of axes (always a list of lists), saved as a
    PNG at ``path`` after the block."""
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    try:
        yield fig, axes
        fig.tight_layout()
        save(fig, path)
    finally:
        plt.close(fig)


def save(fig, path: str | Path) -> Path:
    """Writes ``fig`` as a PNG at ``path``, atomically."""
    path = Path(path)
    files.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path
