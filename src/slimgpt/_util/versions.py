"""Versions of slimgpt and the libraries that change its numbers, read from the installed metadata."""

from __future__ import annotations

import importlib.metadata


def package_version(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def slimgpt_version() -> str:
    version = package_version("slimgpt")
    return "0.1.0" if version == "not installed" else version  # a source tree that was never installed


def versions(*packages: str) -> dict[str, str]:
    """{"slimgpt": ..., package: version, ...} for the given packages."""
    return {"slimgpt": slimgpt_version(), **{name: package_version(name) for name in packages}}
