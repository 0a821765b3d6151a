"""Fault suite for ``slimgpt finetune``: refusals before any work, nothing written, nothing deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_helpers import refused, run, save_tiny

import slimgpt.models.slim as slim


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: object) -> Path:
    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "m", tokenizer)
    lines = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(slim, "load_model", fail)


ARGS = ["finetune", "m", "--data", "data.jsonl", "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "1",
        "--warmup-steps", "0", "--checkpoint-every", "1"]


def test_foreign_checkpoint_dir_is_kept(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "mydata").mkdir()
    (work / "mydata" / "precious.txt").write_text("keep")
    refused(capsys, work, *ARGS, "-o", "out", "--checkpoint-dir", "mydata", "--resume",
            match="not a slimgpt checkpoint")


def test_checkpoint_dir_is_the_input_model(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, *ARGS, "-o", "out", "--checkpoint-dir", "m", "--resume", match="overlaps the input model")


def test_output_is_the_input(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, *ARGS, "-o", "m", "--overwrite", match="overlaps the input model")


def test_weight_decay_inf(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, *ARGS, "-o", "out", "--weight-decay", "inf", match="--weight-decay inf")


def test_bad_device(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, *ARGS, "-o", "out", "--device", "tpu", match="not a torch device")


def test_finished_run_marks_and_removes_its_checkpoint(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    code, errors = run(capsys, *ARGS, "-o", "out")
    assert code == 0, errors
    assert (work / "out" / "model.safetensors").exists()
    assert not (work / "out.checkpoint").exists() and not (work / "out.lock").exists()
