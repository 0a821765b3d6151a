"""The built-in corpus: the Python standard library's own source, split by file.

Every Python installation ships its standard library as source (code plus English docstrings, PSF
licence), so this corpus exists offline on every machine that can run slimgpt. Files are assigned to a
split by a hash of their path relative to the stdlib root, so the split is stable across machines.

The held-out split is also shipped with the package (``assets/corpus/heldout.txt.gz``, built from
CPython 3.11.7) so that held-out perplexity is the same number on every Python version. The held-out
files are never used for training or calibration: ``train`` excludes them by the same path rule.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sysconfig
from importlib import resources
from pathlib import Path

HELDOUT_BUCKETS = 4  # out of 100: about 4% of the files (~0.45 MB of text)
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"})
DOC_SEPARATOR = "\n\n"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(relpath: str) -> int:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """Source files of the standard library in ``split`` ("train" or "heldout"), sorted by path."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    chosen = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(directory) / name
            relpath = path.relative_to(root).as_posix()
            is_heldout = _bucket(relpath) < HELDOUT_BUCKETS
            if is_heldout == (split == "heldout"):
                chosen.append(path)
    return chosen


def read_documents(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_documents() -> list[str]:
    """Training documents: the local standard library minus the held-out files."""
    return read_documents(stdlib_files("train"))


def heldout_text() -> str:
    """The shipped held-out split as one string (documents joined by a blank line)."""
    asset = resources.files("slimgpt") / "assets" / "corpus" / "heldout.txt.gz"
    with asset.open("rb") as handle:
        return gzip.decompress(handle.read()).decode("utf-8")


def build_heldout_asset(destination: Path) -> int:
    """Write the held-out split of the local stdlib to ``destination`` (gzip). Returns its size in chars."""
    text = DOC_SEPARATOR.join(read_documents(stdlib_files("heldout")))
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    return len(text)
