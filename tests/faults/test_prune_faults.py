"""Fault suite for ``slimgpt prune``: each case asserts the exit code, one error line, and the files on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_helpers import FAST, refused, run, save_tiny, snapshot
from safetensors.torch import load_file, save_file

import slimgpt.models.slim as slim


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: object) -> Path:
    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "m", tokenizer)
    return tmp_path


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model must not be loaded: the refusal comes before any heavy work."""
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(slim, "load_model", fail)


# --- 1. folders the tool did not create are never deleted --------------------------------------------


def test_foreign_checkpoint_dir_with_resume_is_kept(work: Path, capsys: pytest.CaptureFixture[str],
                                                     no_load: None) -> None:
    (work / "mydata").mkdir()
    (work / "mydata" / "precious.txt").write_text("keep")
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", "--checkpoint-dir", "mydata", "--resume",
            match="not a slimgpt checkpoint")


def test_foreign_checkpoint_dir_without_resume_is_kept(work: Path, capsys: pytest.CaptureFixture[str],
                                                        no_load: None) -> None:
    (work / "mydata").mkdir()
    (work / "mydata" / "precious.txt").write_text("keep")
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", "--checkpoint-dir", "mydata",
            match="not a slimgpt checkpoint")


def test_checkpoint_dir_is_the_input_model(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", "--checkpoint-dir", "m", "--resume",
            match="overlaps the input model")


def test_checkpoint_dir_is_the_output(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "out").mkdir()
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", "--checkpoint-dir", "out", "--overwrite",
            match="overlap")


def test_finished_run_removes_only_its_own_checkpoint(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, errors = run(capsys, "prune", "m", *FAST, "-o", "out")
    assert code == 0, errors
    assert (work / "out" / "model.safetensors").exists()
    assert not (work / "out.checkpoint").exists() and not (work / "out.lock").exists()
    report = json.loads((work / "out" / "slimgpt_report.json").read_text())
    assert all(row["ffn_damping"] == pytest.approx(0.01) for row in report["layers"])  # the report's new field


def test_remove_checkpoint_leaves_foreign_folders(tmp_path: Path) -> None:
    from slimgpt.saving import remove_checkpoint

    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert not remove_checkpoint(tmp_path)
    assert (tmp_path / "notes.txt").exists()


# --- 5. output equal to / overlapping the input ------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--stream"]])
def test_output_is_the_input(work: Path, capsys: pytest.CaptureFixture[str], no_load: None, extra: list[str]) -> None:
    refused(capsys, work, "prune", "m", *FAST, "-o", "m", "--overwrite", *extra, match="overlaps the input model")


def test_output_inside_the_input(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "-o", "m/pruned", match="overlaps the input model")


def test_output_is_the_current_folder(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "-o", ".", "--overwrite", match="current folder")


# --- 6. non-finite weights ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_input_weights(work: Path, capsys: pytest.CaptureFixture[str], value: float) -> None:
    weights = load_file(str(work / "m" / "model.safetensors"))
    key = next(k for k in weights if "layers.1.mlp.up_proj" in k)
    weights[key][0, 0] = value
    save_file(weights, str(work / "m" / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", match="non-finite weights")


# --- 4. damping ---------------------------------------------------------------------------------------


def test_damping_is_raised_and_reported(work: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    code, errors = run(capsys, "prune", "m", "--calib", "calib.txt", "--nsamples", "1", "--seqlen", "8",
                       "--percdamp", "0", "-o", "out")
    assert code == 0, errors
    assert "raising it to" in caplog.text
    report = json.loads((work / "out" / "slimgpt_report.json").read_text())
    assert max(row["ffn_damping"] for row in report["layers"]) > 0


def test_percdamp_nan(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "--percdamp", "nan", "-o", "out", match="--percdamp nan")


# --- 7. calibration sources -----------------------------------------------------------------------


def test_empty_calib(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", "--calib", "", "-o", "out", match="--calib is empty")


def test_binary_calib(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "noise.txt").write_bytes(torch.randint(128, 256, (20000,), generator=torch.Generator().manual_seed(0))
                                     .to(torch.uint8).numpy().tobytes())
    refused(capsys, work, "prune", "m", "--calib", "noise.txt", "-o", "out", match="not UTF-8 text")


def test_missing_calib(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", "--calib", "nowhere/x.txt", "-o", "out", match="does not exist")


# --- 8. one-line errors for broken models, devices and outputs -----------------------------------


def test_empty_model_folder(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "empty").mkdir()
    refused(capsys, work, "prune", "empty", *FAST, "-o", "out", match="no config.json")


def test_config_without_weights(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "cfg").mkdir()
    (work / "cfg" / "config.json").write_text((work / "m" / "config.json").read_text())
    refused(capsys, work, "prune", "cfg", *FAST, "-o", "out", match="no .safetensors weights")


def test_pickle_only_folder(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "pk").mkdir()
    (work / "pk" / "config.json").write_text((work / "m" / "config.json").read_text())
    (work / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    refused(capsys, work, "prune", "pk", *FAST, "-o", "out", match="only pickle weights")


def test_truncated_weights(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    path = work / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", match="truncated")


def test_corrupt_weights_header(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    path = work / "m" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32
    path.write_bytes(bytes(data))
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", match="header is damaged")


def test_model_is_a_file(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m/config.json", *FAST, "-o", "out", match="is a file")


@pytest.mark.parametrize("device, match", [("tpu", "not a torch device"), ("cuda", "CUDA"), ("cuda:7", "CUDA")])
def test_bad_device(work: Path, capsys: pytest.CaptureFixture[str], no_load: None, device: str, match: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capsys, work, "prune", "m", *FAST, "--device", device, "-o", "out", match=match)


def test_output_under_a_regular_file(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "afile").write_text("x")
    refused(capsys, work, "prune", "m", *FAST, "-o", "afile/out", match="which is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_in_a_read_only_folder(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    try:
        refused(capsys, work, "prune", "m", *FAST, "-o", "ro/out", match="permission denied")
    finally:
        (work / "ro").chmod(0o755)


def test_json_into_a_missing_folder(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", "--json", "nowhere/r.json", match="does not exist")


def test_json_is_a_folder(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    (work / "jdir").mkdir()
    refused(capsys, work, "prune", "m", *FAST, "-o", "out", "--json", "jdir", match="is a folder")


def test_slicegpt_stream(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "--method", "slicegpt", "--stream", "-o", "out",
            match="prune without --stream")


# --- 10. nonsense options against the model's geometry ------------------------------------------


def test_round_to_larger_than_the_ffn(work: Path, capsys: pytest.CaptureFixture[str], no_load: None) -> None:
    refused(capsys, work, "prune", "m", *FAST, "--round-to", "100000", "-o", "out", match="larger than the FFN")


def test_doubtful_options_warn(work: Path, caplog: pytest.LogCaptureFixture) -> None:
    from slimgpt.config import PruneConfig
    from slimgpt.preflight import check_options_against_model

    check_options_against_model(PruneConfig(seqlen=4096, first_ratio=0.5, ratio=0.2), "m")
    assert "longer than the model's context" in caplog.text and "above --ratio" in caplog.text


# --- 3. locks and leftovers -----------------------------------------------------------------------


def test_second_run_on_the_same_output_is_refused(work: Path, capsys: pytest.CaptureFixture[str],
                                                   no_load: None) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / "out.lock").write_text(f"{sleeper.pid} token")
        refused(capsys, work, "prune", "m", *FAST, "-o", "out", match="another slimgpt run")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_and_partial_output_are_cleaned(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "out.lock").write_text(f"{dead.pid} token")
    (work / ".out.partial-abc").mkdir()
    (work / ".out.partial-abc" / "model-00002.safetensors").write_bytes(b"half")
    code, errors = run(capsys, "prune", "m", *FAST, "-o", "out")
    assert code == 0, errors
    assert not (work / ".out.partial-abc").exists() and not (work / "out.lock").exists()
    assert (work / "out" / "model.safetensors").exists()


def test_old_output_kept_while_the_new_one_is_missing(tmp_path: Path) -> None:
    from slimgpt._util.files import remove_stale_partials

    (tmp_path / ".out.old-x").mkdir()
    remove_stale_partials(tmp_path / "out")
    assert (tmp_path / ".out.old-x").exists()  # the replaced output: the only copy left
    assert snapshot(tmp_path) == {".out.old-x": "<dir>"}


@pytest.mark.parametrize(("content", "match"), [("[]", "not a slimgpt evaluation report"), (None, "is a folder")])
def test_compare_refuses_a_list_or_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            content: str | None, match: str) -> None:
    """``slimgpt compare`` given a JSON list, or a folder: one line, exit 2, nothing written."""
    target = tmp_path / "report.json"
    if content is None:
        target.mkdir()
    else:
        target.write_text(content)
    refused(capsys, tmp_path, "compare", str(target), "--out", str(tmp_path / "table.md"), match=match)


def test_demo_checks_its_ratios_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, tmp_path, "demo", "--model", "tiny-mha", "--ratios", "0.2,1.5", match="--ratio 1.5")


@pytest.mark.parametrize("fmt", ["gguf", "llama-padded"])
def test_export_refuses_a_damaged_model(work: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    weights = load_file(str(work / "m" / "model.safetensors"))
    key = next(k for k in weights if "layers.0.self_attn.o_proj" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(work / "m" / "model.safetensors"), metadata={"format": "pt"})
    target = "m.gguf" if fmt == "gguf" else "padded"
    refused(capsys, work, "export", "m", "--format", fmt, "--output", target, match="non-finite weights")


def test_eval_checks_its_datasets_before_loading_the_model(work: Path, capsys: pytest.CaptureFixture[str],
                                                          no_load: None) -> None:
    refused(capsys, work, "eval", "m", "--ppl", "missing-folder/", match="missing-folder")


@pytest.fixture
def offline_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hub offline and a datasets cache with nothing in it (outside the work folder the tests snapshot)."""
    cache = tmp_path.parent / f"{tmp_path.name}-hf" / "datasets"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("stream", [False, True])
def test_prune_checks_a_hub_calibration_source_before_loading_the_model(
        work: Path, capsys: pytest.CaptureFixture[str], no_load: None, offline_empty_cache: Path,
        stream: bool) -> None:
    argv = ["prune", "m", "--calib", "c4", "--nsamples", "4", "--seqlen", "32", "--ratio", "0.3", "-o", "out"]
    message = refused(capsys, work, *argv, *(["--stream"] if stream else []), match="'c4' (allenai/c4")
    assert "offline" in message and str(offline_empty_cache) in message
    assert not (work / "out").exists() and not (work / "out.checkpoint").exists()


def test_eval_checks_a_hub_perplexity_source_before_loading_the_model(
        work: Path, capsys: pytest.CaptureFixture[str], no_load: None, offline_empty_cache: Path) -> None:
    message = refused(capsys, work, "eval", "m", "--ppl", "wikitext2", match="'wikitext2'")
    assert "offline" in message and "wikitext-2-raw-v1" in message
