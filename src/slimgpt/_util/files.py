"""Atomic outputs: a reader (or a crash) sees the old file or folder, or the complete new one.

Every writer in slimgpt goes through these: tensors and text of a checkpoint, a single output file
(GGUF, an edited config.json, a JSON report) and a whole output folder (a saved model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimgpt.errors import OutputExistsError


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` under a temporary name next to ``path``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (creating its folder) so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Fail before any work if ``output`` exists and overwriting was not asked for."""
    path = Path(output)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists: pass --overwrite to replace it, or another --output")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory: choose another --output")
    return path


def check_file_output(output: str | Path, overwrite: bool) -> Path:
    """Fail before any work if ``output`` exists and overwriting was not asked for, or is a folder."""
    path = Path(output)
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a directory: pass a file name such as model.gguf to --output")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists: pass --overwrite to replace it, or another --output")
    return path


def write_atomic_dir(output: str | Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    """Create ``output`` by filling a temporary sibling directory, then renaming it into place.

    A crash leaves either the old directory or the complete new one, never a half-written output.
    """
    path = check_output(output, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
