"""Atomic single-file outputs (GGUF files, an edited config.json), next to slimgpt.io's atomic folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from slimgpt.errors import OutputExistsError


def check_file_output(output: str | Path, overwrite: bool) -> Path:
    """Fail before any work if ``output`` exists and overwriting was not asked for, or is a folder."""
    path = Path(output)
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a directory: pass a file name such as model.gguf to --output")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists: pass --overwrite to replace it, or another --output")
    return path


def write_atomic_file(output: str | Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    """Create ``output`` by writing a temporary sibling file, then renaming it into place.

    A crash leaves the old file (or none), never a truncated one.
    """
    path = check_file_output(output, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        fill(tmp)
        # mkstemp makes the file private (0600); give it the replaced file's mode, or a normal one.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_text(path: Path, text: str) -> None:
    """Replace the contents of an existing file atomically (readers see the old or the new text)."""
    def fill(tmp: Path) -> None:
        tmp.write_text(text)

    write_atomic_file(path, fill, overwrite=True)


def copy_files(files: list[Path], directory: Path) -> None:
    for file in files:
        shutil.copy2(file, directory / file.name)
