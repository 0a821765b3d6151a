"""Kill-and-resume at every commit point of the checkpoint, and damaged, foreign or old checkpoints."""

from __future__ import annotations

import json
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import FAST, refused, run, save_tiny, snapshot

import slimgpt.layerwise.checkpoint as checkpoint_module
import slimgpt.saving as saving
from conftest import calibration, make_model
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.prune import prune_model

ARGS = ["prune", "m", *FAST, "-o", "out"]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: object) -> Path:
    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "m", tokenizer)
    return tmp_path


@pytest.fixture
def reference(work: Path, capsys: pytest.CaptureFixture[str]) -> bytes:
    code, errors = run(capsys, "prune", "m", *FAST, "-o", "ref")
    assert code == 0, errors
    return (work / "ref" / "model.safetensors").read_bytes()


def _crash_on_call(function: Callable[..., Any], nth: int, when: Callable[..., bool] = lambda *a: True) -> Any:
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            calls["n"] += 1
            if calls["n"] == nth:
                raise KeyboardInterrupt  # the CLI's "interrupted" (exit 130): a kill at this point
        return function(*args, **kwargs)

    return wrapped


def _crash_points(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Interrupt the run while it commits layer 1 (the second commit), at ``point``."""
    cp = checkpoint_module
    if point == "layer-file":
        monkeypatch.setattr(cp, "save_tensors_atomic", _crash_on_call(cp.save_tensors_atomic, 3))
    elif point == "stream-file":
        monkeypatch.setattr(cp, "save_tensors_atomic", _crash_on_call(cp.save_tensors_atomic, 4))
    elif point == "state-file":
        monkeypatch.setattr(cp, "write_text_atomic", _crash_on_call(cp.write_text_atomic, 2))
    elif point == "commit-rename":
        original = Path.rename
        monkeypatch.setattr(Path, "rename", _crash_on_call(original, 2, lambda p, *a: p.name.startswith("gen-")))
    elif point == "old-generation-cleanup":
        rmtree = _crash_on_call(shutil.rmtree, 1, lambda p, *a: Path(p).name == "gen-1")
        monkeypatch.setattr(cp, "shutil", types.SimpleNamespace(rmtree=rmtree))
    elif point == "final-save":
        monkeypatch.setattr(saving, "model_card", _crash_on_call(saving.model_card, 1))


POINTS = ["layer-file", "stream-file", "state-file", "commit-rename", "old-generation-cleanup", "final-save"]


@pytest.mark.parametrize("point", POINTS)
def test_kill_and_resume_at_every_commit_point(work: Path, reference: bytes, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    with monkeypatch.context() as patch:
        _crash_points(patch, point)
        code, _ = run(capsys, *ARGS)
    assert code == 130
    assert not (work / "out").exists() and (work / "out.checkpoint").is_dir()
    code, errors = run(capsys, *ARGS, "--resume")
    assert code == 0, errors
    assert (work / "out" / "model.safetensors").read_bytes() == reference  # bit for bit
    assert not (work / "out.checkpoint").exists()


def _interrupted(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint with layers 0 and 1 committed (killed while writing layer 2)."""
    with monkeypatch.context() as patch:
        crash = _crash_on_call(checkpoint_module.save_tensors_atomic, 5)
        patch.setattr(checkpoint_module, "save_tensors_atomic", crash)
        code, _ = run(capsys, *ARGS)
    assert code == 130
    return work / "out.checkpoint"


def test_resume_with_another_model_is_refused(work: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch, tokenizer: object) -> None:
    _interrupted(work, capsys, monkeypatch)
    shutil.rmtree(work / "m")
    save_tiny(work / "m", tokenizer, seed=1)  # same shapes, other weights
    refused(capsys, work, *ARGS, "--resume", match="another model")


def test_resume_with_other_options_is_refused(work: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupted(work, capsys, monkeypatch)
    refused(capsys, work, *ARGS, "--resume", "--percdamp", "0.05", match="other options")


@pytest.mark.parametrize("name", ["layer_0.safetensors", "gen-2/hidden.safetensors"])
def test_zeroed_bytes_in_a_checkpoint_file(work: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    path = _interrupted(work, capsys, monkeypatch) / name
    data = bytearray(path.read_bytes())
    data[-64:] = b"\x00" * 64
    path.write_bytes(bytes(data))
    refused(capsys, work, *ARGS, "--resume", match="damaged")


def test_missing_layer_file(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (_interrupted(work, capsys, monkeypatch) / "layer_1.safetensors").unlink()
    refused(capsys, work, *ARGS, "--resume", match="missing or damaged")


def test_garbage_state(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (_interrupted(work, capsys, monkeypatch) / "gen-2" / "state.json").write_text("{not json")
    refused(capsys, work, *ARGS, "--resume", match="unreadable")


def test_foreign_state(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (_interrupted(work, capsys, monkeypatch) / "gen-2" / "state.json").write_text("[1, 2]")
    refused(capsys, work, *ARGS, "--resume", match="not a slimgpt checkpoint state")


def test_checkpoint_dir_is_a_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "ck").write_text("x")
    refused(capsys, work, *ARGS, "--checkpoint-dir", "ck", "--resume", match="is a file")


def test_old_checkpoint_resumes_with_a_warning(work: Path, reference: bytes, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    folder = _interrupted(work, capsys, monkeypatch)
    state = json.loads((folder / "gen-2" / "state.json").read_text())
    del state["fingerprint"], state["files"]
    (folder / "state.json").write_text(json.dumps(state))  # the layout an older slimgpt wrote
    shutil.move(folder / "gen-2" / "hidden.safetensors", folder / "hidden.safetensors")
    shutil.rmtree(folder / "gen-2")
    (folder / "slimgpt-checkpoint.json").unlink()
    code, errors = run(capsys, *ARGS, "--resume")
    assert code == 0, errors
    assert "older slimgpt" in caplog.text
    assert (work / "out" / "model.safetensors").read_bytes() == reference
    assert not folder.exists()  # recognised as slimgpt's own layout, so removed


def test_resume_with_other_calibration_is_refused(tmp_path: Path) -> None:
    config = PruneConfig(ratio=0.3, nsamples=4, seqlen=16)
    model = make_model("llama")
    prune_model(model, config, calibration(4, 16, seed=1), checkpoint_dir=tmp_path / "ck", stop_after_layer=0,
                progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="other calibration data"):
        prune_model(make_model("llama"), config, calibration(4, 16, seed=2), checkpoint_dir=tmp_path / "ck",
                    resume=True, progress=False)
    assert snapshot(tmp_path) == before
