"""The on-disk token cache of the shipped corpora: a second call reads it, a changed key misses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimgpt.corpus as corpus
import slimgpt.data.token_cache as token_cache
import slimgpt.data.windows as windows
from slimgpt.data import calibration_windows, eval_windows

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" * 3 for i in range(40)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "train_documents", lambda: list(DOCS))
    return tmp_path / token_cache.FOLDER


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = windows._encode

    def counting(tokenizer, texts):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(tokenizer, texts)

    monkeypatch.setattr(windows, "_encode", counting)
    return calls


def test_second_call_reads_the_cache(cache: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls = _count_encodes(monkeypatch)
    first = calibration_windows(tokenizer, "builtin", 6, 16, seed=3)
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    second = calibration_windows(tokenizer, "builtin", 6, 16, seed=3)
    assert len(calls) == 1  # read from the cache, not tokenized again
    assert torch.equal(first, second) and second.dtype == torch.long
    assert not list(cache.glob("*.tmp"))  # written atomically, no leftovers


def test_changed_text_or_tokenizer_misses(cache: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls = _count_encodes(monkeypatch)
    calibration_windows(tokenizer, "builtin", 4, 16)
    monkeypatch.setattr(corpus, "train_documents", lambda: [*DOCS[:-1], "def other():\n    pass\n" * 20])
    calibration_windows(tokenizer, "builtin", 4, 16)
    assert len(calls) == 2 and len(list(cache.glob("*.safetensors"))) == 2
    monkeypatch.setattr(token_cache, "tokenizer_digest", lambda _tok: "another tokenizer")
    calibration_windows(tokenizer, "builtin", 4, 16)
    assert len(calls) == 3


def test_stale_or_damaged_file_is_not_used(cache: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls = _count_encodes(monkeypatch)
    expected = calibration_windows(tokenizer, "builtin", 4, 16)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    assert torch.equal(calibration_windows(tokenizer, "builtin", 4, 16), expected)
    assert len(calls) == 2  # tokenized again, and the file rewritten
    token_cache.write_tokens(path, torch.zeros(3, dtype=torch.long), {"format": "0"})  # other metadata
    assert torch.equal(calibration_windows(tokenizer, "builtin", 4, 16), expected)
    assert len(calls) == 3


def test_local_sources_are_not_cached(cache: Path, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = tmp_path / "notes.txt"
    text.write_text("".join(DOCS))
    eval_windows(tokenizer, str(text), 16)
    assert not cache.exists()
