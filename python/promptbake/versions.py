"""Versions recorded in every manifest: promptbake's own, and the libraries a result depends on."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def promptbake_version() -> str:
    """The installed promptbake's version ("0.0.0" from a source tree never installed)."""
    try:
        return version("promptbake")
    except PackageNotFoundError:
        return "0.0.0"


def libraries(*names: str) -> dict[str, str]:
    """{"python": ..., name: version} for each installed distribution in ``names``."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
