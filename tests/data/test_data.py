"""Tests for slimgpt.data: sources, local files, window protocols and Hub failures, offline and on CPU.

Hub datasets are never downloaded: the offline and unreachable paths are exercised for real (against a
temporary cache and a local server that never answers), and the Hub-specific shaping (C4 per-document
windows, the Alpaca held-back slice) runs on small in-memory datasets put in place of the loader.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

import slimgpt.data.hub as data_hub
from slimgpt import corpus, data
from slimgpt.errors import ConfigError, DataError

HUB_NAMES = [name for name, source in data.SOURCES.items() if isinstance(source, data.HubSource)]
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _make_tokenizer(model_max_length: int = 1_000_000) -> PreTrainedTokenizerBase:
    """A byte-level BPE (every string encodes, no unknown token) trained in milliseconds."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    sentences = ["the quick brown fox jumps over the lazy dog", "def main(): return None", "word 0123456789"]
    tokenizer.train_from_iterator(sentences * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return _make_tokenizer()


def _numbered_text(first: int, count: int) -> str:
    """Text whose token windows are all distinct, so "is a slice of the stream" can fail."""
    return " ".join(f"word{i}" for i in range(first, first + count))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _slice_starts(window: torch.Tensor, stream: torch.Tensor) -> list[int]:
    """Every offset at which ``window`` occurs as a contiguous slice of ``stream``."""
    if stream.numel() < window.numel():
        return []
    candidates = stream.unfold(0, window.numel(), 1)  # [positions, seqlen]
    return (candidates == window).all(dim=1).nonzero().flatten().tolist()


def _data_error_within(seconds: float, call: Callable[[], object]) -> DataError:
    """The DataError ``call`` raises, failing the test (not hanging it) if none comes within ``seconds``."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as error:  # handed to the test thread below
            outcome.append(error)

    worker = threading.Thread(target=target, daemon=True)  # daemon: a hung call cannot block exit
    worker.start()
    worker.join(seconds)
    assert outcome, f"no answer within {seconds} s"
    assert isinstance(outcome[0], DataError), f"expected DataError, got {outcome[0]!r}"
    return outcome[0]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(_numbered_text(0, 400), encoding="utf-8")
    return path


# --- local sources ----------------------------------------------------------------------------------


def test_txt_file_is_one_document_for_both_splits(text_file: Path) -> None:
    expected = [text_file.read_text(encoding="utf-8")]
    assert data.load_documents(str(text_file)) == expected
    assert data.load_documents(str(text_file), "eval") == expected


def test_jsonl_file_gives_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second\ndoc"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert data.load_documents(str(path)) == ["first doc", "second\ndoc"]


def test_jsonl_without_text_field_names_the_fields_it_has(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no 'text' field") as caught:
        data.load_documents(str(path))
    message = str(caught.value)
    assert "prompt" in message and "completion" in message and "line 1" in message
    assert "\n" not in message


def test_jsonl_with_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        data.load_documents(str(path))


def test_directory_reads_its_txt_and_jsonl_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("not data", encoding="utf-8")
    assert data.load_documents(str(tmp_path)) == ["from a", "from b"]


def test_directory_without_data_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not data", encoding="utf-8")
    with pytest.raises(DataError, match=r"holds no \.txt or \.jsonl files"):
        data.load_documents(str(tmp_path))


def test_unsupported_file_type_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "calib.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"not a \.txt or \.jsonl file"):
        data.load_documents(str(path))


@pytest.mark.parametrize("missing", ["no/such/dir", "missing.txt", "missing.jsonl"])
def test_missing_path_is_an_error(missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist") as caught:
        data.load_documents(missing)
    assert missing in str(caught.value)


def test_unknown_name_lists_the_known_sources_and_local_paths() -> None:
    with pytest.raises(DataError, match="unknown data source 'c5'") as caught:
        data.load_documents("c5")
    message = str(caught.value)
    assert all(name in message for name in data.SOURCES)
    assert "local path" in message


def test_bad_arguments_are_config_errors(text_file: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ConfigError, match="split"):
        data.load_documents(str(text_file), "test")
    with pytest.raises(ConfigError, match="nsamples"):
        data.calibration_windows(tokenizer, str(text_file), nsamples=0, seqlen=8)
    with pytest.raises(ConfigError, match="windowing"):
        data.calibration_windows(tokenizer, str(text_file), nsamples=1, seqlen=8, windowing="random")
    with pytest.raises(ConfigError, match="max_windows"):
        data.eval_windows(tokenizer, str(text_file), seqlen=8, max_windows=0)


# --- builtin source ---------------------------------------------------------------------------------


def test_builtin_eval_is_the_shipped_heldout_text(tokenizer: PreTrainedTokenizerBase) -> None:
    heldout = corpus.heldout_text()
    assert data.load_documents("builtin", "eval") == [heldout]
    windows = data.eval_windows(tokenizer, "builtin", seqlen=32, max_windows=4)
    assert windows.shape == (4, 32)
    assert torch.equal(windows.flatten(), _encode(tokenizer, heldout)[: 4 * 32])


def test_builtin_calibration_draws_from_the_stdlib_train_split(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The full train split takes ~10 s to tokenize on a small CPU; a few of its real files keep the
    # test in seconds while still going through corpus.train_documents.
    some_documents = corpus.train_documents()[:6]
    monkeypatch.setattr(corpus, "train_documents", lambda: some_documents)
    windows = data.calibration_windows(tokenizer, "builtin", nsamples=4, seqlen=24)
    stream = _encode(tokenizer, corpus.DOC_SEPARATOR.join(some_documents))
    assert windows.shape == (4, 24)
    assert all(_slice_starts(window, stream) for window in windows)


# --- calibration windows ----------------------------------------------------------------------------


def test_calibration_windows_are_seeded(tokenizer: PreTrainedTokenizerBase, text_file: Path) -> None:
    first = data.calibration_windows(tokenizer, str(text_file), nsamples=8, seqlen=16, seed=0)
    again = data.calibration_windows(tokenizer, str(text_file), nsamples=8, seqlen=16, seed=0)
    other = data.calibration_windows(tokenizer, str(text_file), nsamples=8, seqlen=16, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_calibration_windows_are_slices_of_the_joined_token_stream(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    documents = [_numbered_text(0, 150), _numbered_text(150, 150), _numbered_text(300, 150)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    windows = data.calibration_windows(tokenizer, str(path), nsamples=16, seqlen=20, seed=3)
    stream = _encode(tokenizer, "\n\n".join(documents))
    assert windows.shape == (16, 20)
    assert windows.dtype == torch.long
    starts = [_slice_starts(window, stream) for window in windows]
    assert all(len(found) == 1 for found in starts)  # unique text: each window sits at exactly one offset
    assert len({found[0] for found in starts}) > 1  # random offsets, not one window repeated


def test_too_little_data_names_the_tokens_available_and_needed(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = tmp_path / "short.txt"
    path.write_text(_numbered_text(0, 20), encoding="utf-8")
    available = _encode(tokenizer, path.read_text(encoding="utf-8")).numel()
    with pytest.raises(DataError) as caught:
        data.calibration_windows(tokenizer, str(path), nsamples=4, seqlen=available)
    message = str(caught.value)
    assert str(path) in message
    assert f"has {available} tokens" in message and f"need {4 * available}" in message
    assert "--nsamples" in message and "--seqlen" in message


# --- eval windows -----------------------------------------------------------------------------------


def test_eval_windows_are_consecutive_and_drop_the_tail(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(_numbered_text(0, 60), encoding="utf-8")
    (tmp_path / "b.txt").write_text(_numbered_text(60, 60), encoding="utf-8")
    stream = _encode(tokenizer, _numbered_text(0, 60) + "\n\n" + _numbered_text(60, 60))
    seqlen = 24
    count = stream.numel() // seqlen
    assert stream.numel() % seqlen != 0  # the test needs a tail to drop

    windows = data.eval_windows(tokenizer, str(tmp_path), seqlen=seqlen)
    assert windows.shape == (count, seqlen)
    assert torch.equal(windows.flatten(), stream[: count * seqlen])
    assert torch.equal(data.eval_windows(tokenizer, str(tmp_path), seqlen, max_windows=2), windows[:2])


def test_eval_shorter_than_one_window_is_an_error(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("word1 word2", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than one window of 512"):
        data.eval_windows(tokenizer, str(path), seqlen=512)


@pytest.fixture()
def transformers_warnings() -> Iterator[None]:
    """Other tests (lm-eval) may silence transformers' logger; make its warnings visible to caplog here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@pytest.mark.usefixtures("transformers_warnings")
def test_long_text_does_not_trigger_the_max_length_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    short_tokenizer = _make_tokenizer(model_max_length=8)  # fresh: transformers warns once per instance
    path = tmp_path / "long.txt"
    path.write_text(_numbered_text(0, 50), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        data.eval_windows(short_tokenizer, str(path), seqlen=8)
        data.calibration_windows(short_tokenizer, str(path), nsamples=2, seqlen=8)
    assert "longer than the specified maximum" not in caplog.text
    with caplog.at_level(logging.WARNING):  # the check can fail: the warning does reach caplog
        short_tokenizer(_numbered_text(0, 50))
    assert "longer than the specified maximum" in caplog.text


# --- Hub sources, shaped offline --------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Replace the Hub download with in-memory rows; records which split and file were asked for."""
    state: dict[str, Any] = {"rows": [], "calls": []}

    def load(name: str, hub: data.HubSource, hub_split: str, files: str | None) -> datasets.Dataset:
        state["calls"].append((name, hub_split, files))
        return datasets.Dataset.from_list(state["rows"])

    monkeypatch.setattr(data_hub, "load_hub_split", load)
    yield state


def _alpaca_rows(count: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"task {i}", "input": f"context {i}" if i % 2 else "", "output": f"answer {i}"}
        for i in range(count)
    ]


def test_alpaca_eval_is_a_held_back_tail_calibration_never_sees(fake_hub: dict[str, Any]) -> None:
    fake_hub["rows"] = _alpaca_rows(40)
    calibration = data.load_documents("alpaca", "calibration")
    evaluation = data.load_documents("gpt4-alpaca", "eval")
    assert len(calibration) == 38 and len(evaluation) == 2  # ceil(5% of 40) = 2 held back
    assert not set(calibration) & set(evaluation)
    assert "answer 38" in evaluation[0] and "answer 39" in evaluation[1]
    assert all(f"answer {i}" in calibration[i] for i in range(38))
    assert [call[1] for call in fake_hub["calls"]] == ["train", "train"]


def test_alpaca_record_uses_the_standard_prompt(fake_hub: dict[str, Any]) -> None:
    fake_hub["rows"] = _alpaca_rows(40)
    without_input, with_input = data.load_documents("alpaca")[:2]
    assert without_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\ntask 0\n\n### Response:\nanswer 0"
    )
    assert "paired with an input" in with_input
    assert "### Instruction:\ntask 1\n\n### Input:\ncontext 1\n\n### Response:\nanswer 1" in with_input


def test_wikitext_eval_reads_the_test_split_joined_by_blank_lines(
    fake_hub: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [_numbered_text(0, 30), "", _numbered_text(30, 30)]
    fake_hub["rows"] = [{"text": row} for row in rows]
    windows = data.eval_windows(tokenizer, "wikitext2", seqlen=10)
    stream = _encode(tokenizer, "\n\n".join(rows))
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    assert fake_hub["calls"] == [("wikitext2", "test", None)]


def test_hub_rows_without_the_expected_column_name_the_columns(fake_hub: dict[str, Any]) -> None:
    fake_hub["rows"] = [{"content": "x", "meta": "y"}]
    with pytest.raises(DataError, match="no 'sentence' column") as caught:
        data.load_documents("ptb")
    assert "content" in str(caught.value) and "meta" in str(caught.value)


def test_c4_draws_one_window_per_long_document(fake_hub: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> None:
    long_documents = [_numbered_text(1000 * i, 40) for i in range(12)]
    short_documents = [f"short{i}" for i in range(12)]
    fake_hub["rows"] = [{"text": text} for pair in zip(long_documents, short_documents, strict=True) for text in pair]
    windows = data.calibration_windows(tokenizer, "c4", nsamples=8, seqlen=16, seed=0)
    assert windows.shape == (8, 16)
    assert fake_hub["calls"][0] == ("c4", "train", "en/c4-train.00000-of-01024.json.gz")
    streams = [_encode(tokenizer, text) for text in long_documents]
    homes = [[k for k, stream in enumerate(streams) if _slice_starts(window, stream)] for window in windows]
    assert all(len(home) == 1 for home in homes)  # each window lies inside one long document
    assert len({home[0] for home in homes}) == 8  # and each comes from a different one
    assert torch.equal(windows, data.calibration_windows(tokenizer, "c4", nsamples=8, seqlen=16, seed=0))
    assert not torch.equal(windows, data.calibration_windows(tokenizer, "c4", nsamples=8, seqlen=16, seed=1))


def test_c4_with_too_few_long_documents_is_an_error(
    fake_hub: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> None:
    fake_hub["rows"] = [{"text": _numbered_text(0, 40)}, {"text": "short"}, {"text": _numbered_text(99, 40)}]
    with pytest.raises(DataError, match="has 2 documents longer than 16 tokens") as caught:
        data.calibration_windows(tokenizer, "c4", nsamples=5, seqlen=16)
    assert "--nsamples" in str(caught.value)


# --- Hub failures, for real -------------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return tmp_path / "hf" / "datasets"


@pytest.mark.parametrize("name", HUB_NAMES)
def test_offline_hub_source_not_in_cache_fails_at_once(
    name: str, empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in OFFLINE_VARIABLES[:2]:
        monkeypatch.setenv(variable, "1")
    hub = data.SOURCES[name]
    assert isinstance(hub, data.HubSource)
    message = str(_data_error_within(5.0, lambda: data.load_documents(name)))
    assert repr(name) in message and hub.hub_id in message
    assert "offline" in message and str(empty_hf_cache) in message and "\n" not in message


def test_offline_windows_fail_fast_with_the_dataset_named(
    tokenizer: PreTrainedTokenizerBase, empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = _data_error_within(5.0, lambda: data.calibration_windows(tokenizer, "wikitext2", nsamples=4, seqlen=8))
    assert "'wikitext2' (Salesforce/wikitext/wikitext-2-raw-v1)" in str(error)
    error = _data_error_within(5.0, lambda: data.eval_windows(tokenizer, "c4", seqlen=8))
    assert "allenai/c4:en/c4-validation.00000-of-00008.json.gz" in str(error)


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch, empty_hf_cache: Path) -> Iterator[str]:
    """A Hub endpoint that accepts connections and never answers: a firewall that drops replies."""
    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(data_hub, "HUB_PROBE_TIMEOUT_S", 0.5)
        yield endpoint


def test_unreachable_hub_fails_within_seconds(silent_hub: str) -> None:
    message = str(_data_error_within(5.0, lambda: data.load_documents("ptb", "eval")))
    assert "cannot reach the Hugging Face Hub" in message
    assert silent_hub in message and "'ptb'" in message and "ptb-text-only/ptb_text_only" in message
    assert "--calib PATH" in message


# --- provenance -------------------------------------------------------------------------------------


def test_describe_source_names_what_is_read(text_file: Path) -> None:
    c4 = data.describe_source("c4")
    assert c4["hub_id"] == "allenai/c4" and c4["data_files"] == "en/c4-train.00000-of-01024.json.gz"
    assert data.describe_source("c4", "eval")["data_files"] == "en/c4-validation.00000-of-00008.json.gz"
    wikitext = data.describe_source("wikitext2", "eval")
    assert (wikitext["config"], wikitext["hub_split"]) == ("wikitext-2-raw-v1", "test")
    assert "held back" in str(data.describe_source("alpaca", "eval")["rows"])
    assert data.describe_source("builtin")["kind"] == "builtin"
    local = data.describe_source(str(text_file), "eval")
    assert local["path"] == str(text_file.resolve()) and local["files"] == ["calib.txt"]
    for name in [*data.SOURCES, str(text_file)]:
        json.dumps(data.describe_source(name))  # a report can store it as is
