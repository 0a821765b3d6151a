"""The CLI: one-line errors before any work, nothing written on failure, a complete output on success."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import TEXT, make_model
from slimgpt.cli import main


@pytest.fixture()
def model_dir(tmp_path: Path, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "dense"
    make_model("llama-gqa").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT * 40)
    return path


def _prune(model_dir: Path, calib: Path, output: Path, *extra: str) -> int:
    return main(["-q", "prune", str(model_dir), "--ratio", "0.3", "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(output), *extra])


def test_prune_writes_a_complete_model(model_dir: Path, calib_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert _prune(model_dir, calib_file, out, "--json", str(tmp_path / "r.json")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "slimgpt_report.json", "README.md", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert not (tmp_path / "out.checkpoint").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "slimgpt_llama"
    assert "realised" in capsys.readouterr().out
    assert (tmp_path / "r.json").exists()


def test_existing_output_needs_overwrite(model_dir: Path, calib_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _prune(model_dir, calib_file, out) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _prune(model_dir, calib_file, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("ratio", ["1.0", "-0.2", "1.5"])
def test_ratio_out_of_range(model_dir: Path, calib_file: Path, tmp_path: Path, capsys, ratio: str) -> None:  # type: ignore[no-untyped-def]
    code = main(["prune", str(model_dir), "--ratio", ratio, "--calib", str(calib_file), "--output",
                 str(tmp_path / "o")])
    assert code == 2 and "--ratio" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_model_type(tmp_path: Path, calib_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(path)
    assert _prune(path, calib_file, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "not supported" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_data(model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    assert _prune(model_dir, short, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "--nsamples" in err or "nsamples" in err
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path: Path, calib_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _prune(tmp_path / "nope", calib_file, tmp_path / "o") == 2
    assert "cannot load model" in capsys.readouterr().err


def test_resume_requires_flag_when_checkpoint_exists(model_dir: Path, calib_file: Path, tmp_path: Path,
                                                     capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "o.checkpoint").mkdir()
    assert _prune(model_dir, calib_file, tmp_path / "o") == 2
    assert "--resume" in capsys.readouterr().err
    assert _prune(model_dir, calib_file, tmp_path / "o", "--resume") == 0  # an empty checkpoint: start fresh
