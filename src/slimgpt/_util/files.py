"""Atomic outputs: a reader (or a crash) sees the old file or folder, or the complete new one.

Every writer in slimgpt goes through these: tensors and text of a checkpoint, a single output file
(GGUF, an edited config.json, a JSON report) and a whole output folder (a saved model).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from slimgpt.errors import OutputExistsError

logger = logging.getLogger(__name__)


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


# --- checkpoint folders, locks and leftovers of a dead run ---------------------------------------------

CHECKPOINT_MARKER = "slimgpt-checkpoint.json"
# What a checkpoint folder written by an older slimgpt (before the marker) may hold; nothing else.
_OLD_CHECKPOINT_FILES = ("state.json", "hidden.safetensors", "stream.safetensors", "embeddings.safetensors",
                         "optimizer.safetensors", "rng.safetensors", "adapter")


def write_checkpoint_marker(directory: Path) -> None:
    """Mark ``directory`` as a checkpoint folder slimgpt created (only such folders are ever deleted)."""
    marker = directory / CHECKPOINT_MARKER
    if not marker.exists():
        write_text_atomic('{"created_by": "slimgpt", "format": 2}\n', marker)


def is_checkpoint_dir(directory: Path) -> bool:
    """``directory`` is a slimgpt checkpoint: it has the marker, or only what an older slimgpt wrote."""
    if (directory / CHECKPOINT_MARKER).is_file():
        return True
    if not (directory / "state.json").is_file():
        return False
    return all(p.name in _OLD_CHECKPOINT_FILES or p.name.endswith(".tmp")
               or (p.name.startswith("layer_") and p.name.endswith(".safetensors")) for p in directory.iterdir())


def remove_checkpoint(directory: Path) -> bool:
    """Delete a finished run's checkpoint folder, only if slimgpt created it; returns whether it did."""
    if not directory.is_dir():
        return False
    if not is_checkpoint_dir(directory):
        logger.warning("%s is not a slimgpt checkpoint folder: left as it is", directory)
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``OUTPUT.lock`` next to the output: a second run on the same output is refused while the first lives.

    The file holds the owner's pid and a token; a lock whose process is gone (killed) is stale and taken
    over. Released by ``release``, at interpreter exit, or when the object is collected.
    """

    _held: ClassVar[set[str]] = set()

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".lock")
        self.token = f"{os.getpid()} {uuid.uuid4().hex}"
        self.held = False

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise OutputExistsError(f"another slimgpt run is writing {self.path.with_suffix('')} (lock "
                                            f"{self.path}): wait for it to finish, or delete the lock if it is not "
                                            "running") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(self.token)
            self.held = True
            OutputLock._held.add(self.token)
            atexit.register(_release_at_exit, weakref.ref(self))  # a weak reference: collecting it releases too
            return self
        raise OutputExistsError(f"cannot take the lock {self.path}: delete it and run again")

    def _stale(self) -> bool:
        try:
            pid_text, _, token = self.path.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return True  # unreadable or half-written: no live run wrote it completely
        if pid == os.getpid():
            return f"{pid} {token}" not in OutputLock._held
        return not _pid_alive(pid)

    def release(self) -> None:
        if self.held:
            self.held = False
            OutputLock._held.discard(self.token)
            with contextlib.suppress(OSError):
                if self.path.read_text() == self.token:
                    self.path.unlink()

    def __del__(self) -> None:
        self.release()


def _release_at_exit(reference: weakref.ReferenceType[OutputLock]) -> None:
    lock = reference()
    if lock is not None:
        lock.release()


def remove_stale_partials(output: Path) -> list[Path]:
    """Delete the ``.OUTPUT.partial-*`` / ``.OUTPUT.old-*`` folders a killed run left (hold the lock first)."""
    removed = []
    if output.parent.is_dir():
        # An ``.old-*`` folder holds the replaced output; it is stale only once the new output is in place.
        olds = sorted(output.parent.glob(f".{output.name}.old-*")) if output.exists() else []
        for leftover in sorted(output.parent.glob(f".{output.name}.partial-*")) + olds:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    if removed:
        logger.warning("removed %d partial output(s) of an earlier run that did not finish: %s", len(removed),
                       ", ".join(p.name for p in removed))
    return removed
