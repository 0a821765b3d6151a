"""Shared pieces of the fault suite: a saved tiny model, a CLI runner, and a snapshot of files on disk."""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import pytest

from conftest import TEXT, make_model
from slimgpt.cli import main

FAST = ["--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--ratio", "0.3"]


def save_tiny(directory: Path, tokenizer: object, seed: int = 0) -> Path:
    calib = directory.parent / "calib.txt"  # FAST's calibration text (a local file: no corpus to tokenize)
    if not calib.exists():
        calib.write_text(TEXT * 40)
    model = make_model("llama", seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its bytes (folders as '<dir>')."""
    files = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        files[key] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """Run the CLI; returns the exit code and the 'slimgpt: error:' lines it printed."""
    code = main(["-q", *argv])
    gc.collect()  # a refused run's lock is released when collected (a CLI process releases it at exit)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("slimgpt: error:")]


def refused(capsys: pytest.CaptureFixture[str], root: Path, *argv: str, match: str) -> str:
    """Run the CLI, expect exit 2 with one error line containing ``match``, and no file changed under root."""
    before = snapshot(root)
    code, errors = run(capsys, *argv)
    assert code == 2, errors
    assert len(errors) == 1, errors
    assert match in errors[0], errors[0]
    after = snapshot(root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) ^ set(after)}
    return errors[0]
