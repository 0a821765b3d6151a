"""Calibration and evaluation data: named sources, local files, and the token windows cut from them.

SlimGPT estimates each layer's Hessian from calibration activations, so the calibration windows are
part of the method, not a detail (method doc section 9): the paper draws 256 random 2048-token windows
from the first C4 shard with seed 0, and reports WikiText-2 perplexity on non-overlapping 128- and
2048-token windows. This module turns a source name the user types (``c4``, ``wikitext2``, ``ptb``,
``alpaca``, ``gpt4-alpaca``, ``builtin``) or a local path into those windows, with the same
protocol every time.

Three kinds of source, one interface:

- Hub datasets, described as data in ``SOURCES`` (id, config, files, split, field) so that a report
  can quote exactly what was read (``describe_source``). They are loaded with the released
  ``datasets`` package, which keeps its own on-disk cache.
- ``builtin``: ``slimgpt.corpus``, the Python standard library's source. It exists offline on every
  machine, so the tool and its tests always have data.
- A local ``.txt`` file, ``.jsonl`` file (one object per line with a ``text`` field), or a directory of
  them. This is the answer for offline users: the error messages point to it.

Every problem a user can fix (unknown name, missing file, Hub offline or unreachable, too little text)
is a one-line ``DataError`` raised before any pruning work. Nothing is cached in memory: ``datasets``
already caches downloads on disk, and a tokenized stream depends on the tokenizer, which has no cheap
stable key.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch

from slimgpt import corpus
from slimgpt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Split = Literal["calibration", "eval"]
Windowing = Literal["stream", "documents"]

SPLITS: tuple[str, ...] = ("calibration", "eval")
WINDOWINGS: tuple[str, ...] = ("stream", "documents")
LOCAL_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")
LOCAL_HINT = "pass a local file (--calib PATH / --data PATH)"

# Seconds to wait for the Hub to answer before calling it unreachable. huggingface_hub retries a
# failed request 5 times with backoff (about 23 s when DNS fails at once, over a minute when packets
# are dropped), so one short probe decides first.
HUB_PROBE_TIMEOUT_S = 5.0
# Documents tokenized per call in "documents" windowing: big enough to amortise the call, small enough
# that few are wasted once nsamples windows are found.
DOCUMENT_BATCH = 64
_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face Hub, written as data so that a report can quote what was read.

    ``calibration_files`` / ``eval_files`` name one data file inside the repository when only part of
    it is wanted (C4: one 300 MB shard, not 1024 of them). ``heldout_fraction`` > 0 means the dataset
    has a single split: eval reads the last fraction of it and calibration everything before, so the
    two never overlap. ``eval_documents`` caps how many eval documents are read.
    """

    hub_id: str
    calibration_split: str
    eval_split: str
    config: str | None = None
    revision: str | None = None
    calibration_files: str | None = None
    eval_files: str | None = None
    field: str = "text"
    record_format: Literal["text", "alpaca"] = "text"
    heldout_fraction: float = 0.0
    eval_documents: int | None = None
    windowing: Windowing = "stream"


@dataclass(frozen=True)
class BuiltinSource:
    """``slimgpt.corpus``: calibration from the local stdlib (train split), eval from the shipped held-out."""

    windowing: Windowing = "stream"


@dataclass(frozen=True)
class LocalSource:
    """A user's ``.txt`` / ``.jsonl`` file or directory of them. It has no splits: both read all of it."""

    path: Path
    windowing: Windowing = "stream"


@dataclass(frozen=True)
class EnglishSource:
    """``slimgpt.english`` (issue 13): shipped English prose, calibration and eval chapters disjoint."""

    windowing: Windowing = "stream"


Source = HubSource | BuiltinSource | LocalSource | EnglishSource

SOURCES: Mapping[str, HubSource | BuiltinSource | EnglishSource] = MappingProxyType(
    {
        # The paper's calibration set (section 9): the first shard of C4 "en". Its 356k documents are
        # too many to tokenize for 256 windows, so windows are sampled per document, as GPTQ does.
        # GPTQ's C4 evaluation reads the first 1100 validation documents; so do we.
        "c4": HubSource(
            hub_id="allenai/c4",
            calibration_split="train",
            eval_split="validation",
            calibration_files="en/c4-train.00000-of-01024.json.gz",
            eval_files="en/c4-validation.00000-of-00008.json.gz",
            eval_documents=1100,
            windowing="documents",
        ),
        # The canonical "wikitext" repository now lives under the Salesforce org; the bare name only
        # works through a Hub redirect, and datasets keys its cache by the name passed.
        "wikitext2": HubSource(
            hub_id="Salesforce/wikitext",
            config="wikitext-2-raw-v1",
            calibration_split="train",
            eval_split="test",
        ),
        # "ptb_text_only" (now ptb-text-only/ptb_text_only) is a loading script, which datasets >= 4
        # refuses to run. The Hub's own parquet conversion of the same repository, on the branch
        # refs/convert/parquet (penn_treebank/{train,validation,test}/0000.parquet, column
        # "sentence"), has the same rows and needs no script.
        "ptb": HubSource(
            hub_id="ptb-text-only/ptb_text_only",
            revision="refs/convert/parquet",
            calibration_split="train",
            eval_split="test",
            calibration_files="penn_treebank/train/0000.parquet",
            eval_files="penn_treebank/test/0000.parquet",
            field="sentence",
        ),
        # Instruction data (paper table 14: better commonsense accuracy than C4 calibration). Only a
        # train split exists, so the last 5% is held back for eval.
        "alpaca": HubSource(
            hub_id="yahma/alpaca-cleaned",
            calibration_split="train",
            eval_split="train",
            record_format="alpaca",
            heldout_fraction=0.05,
        ),
        "gpt4-alpaca": HubSource(
            hub_id="vicgalle/alpaca-gpt4",
            calibration_split="train",
            eval_split="train",
            record_format="alpaca",
            heldout_fraction=0.05,
        ),
        "builtin": BuiltinSource(),
        "english": EnglishSource(),  # issue 13
    }
)


# --- public API -------------------------------------------------------------------------------------


def load_documents(source: str, split: str = "calibration") -> list[str]:
    """The documents of ``source`` for ``split`` ("calibration": a train split; "eval": a test split).

    A local path has no splits: both return all of its documents (a ``.txt`` file is one document, a
    ``.jsonl`` line is one document, a directory is its sorted ``.txt``/``.jsonl`` files).
    """
    checked_split = _check_split(split)
    return list(_documents(source, _resolve(source), checked_split))


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    windowing: str | None = None,
) -> torch.Tensor:
    """``nsamples`` random windows of exactly ``seqlen`` tokens: a LongTensor [nsamples, seqlen].

    The windows follow GPTQ's protocol, which the paper uses: random windows, a ``torch.Generator``
    seeded with ``seed``, so the same arguments give the same windows on every machine. No special
    tokens are added, so every window is a plain slice of the text's tokens (GPTQ's windows start at
    random offsets too, so they almost never hold the one BOS its tokenizer call adds).

    How windows are drawn (``windowing``; by default the source's own, "stream" for local paths):

    - "stream" (every source but ``c4``): the documents joined by a blank line are tokenized once and
      each window starts at a uniform random offset of that token stream. Short documents (Alpaca
      records, WikiText lines) need this: few of them hold a whole window on their own. Raises
      ``DataError`` if the stream has fewer than ``nsamples * seqlen`` tokens, which would make the
      windows mostly repeat each other.
    - "documents" (``c4``): documents are visited in a seeded random order, each tokenized on its
      own; one with more than ``seqlen`` tokens gives one window at a random offset, a shorter one is
      skipped. Only the visited documents are tokenized, so a 356k-document shard costs seconds.
      Unlike GPTQ (which draws with replacement) each window comes from a different document, so
      the loop ends; raises ``DataError`` if fewer than ``nsamples`` documents are long enough.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    resolved = _resolve(source)
    mode = _check_windowing(windowing) if windowing is not None else resolved.windowing
    documents = _documents(source, resolved, "calibration")
    generator = torch.Generator().manual_seed(seed)
    if mode == "documents":
        return _document_windows(tokenizer, documents, source, nsamples, seqlen, generator)

    stream = _encode_stream(tokenizer, documents)
    needed = nsamples * seqlen
    if stream.numel() < needed:
        raise DataError(
            f"calibration source {source!r} has {stream.numel()} tokens but {nsamples} samples of "
            f"{seqlen} tokens need {needed}: pass fewer --nsamples, a shorter --seqlen, or more data"
        )
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=generator)
    offsets = starts[:, None] + torch.arange(seqlen)  # [nsamples, seqlen]
    return stream[offsets]


def eval_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping ``seqlen``-token windows of the eval text: a LongTensor [n, seqlen].

    The standard perplexity protocol: the eval documents joined by a blank line ("\\n\\n".join, as
    everyone does for WikiText-2), tokenized once without special tokens, cut into consecutive
    windows; the tail shorter than a window is dropped. ``max_windows`` keeps only the first windows.
    """
    _check_positive(seqlen=seqlen)
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    stream = _encode_stream(tokenizer, _documents(source, _resolve(source), "eval"))
    count = stream.numel() // seqlen
    if count == 0:
        raise DataError(
            f"eval source {source!r} has {stream.numel()} tokens, fewer than one window of {seqlen}: "
            "pass a shorter --seqlen or more data"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    # clone: a view would keep the whole token stream alive for as long as the windows live.
    return stream[: count * seqlen].reshape(count, seqlen).clone()


def describe_source(source: str, split: str = "calibration") -> dict[str, object]:
    """Where ``split`` of ``source`` comes from, as JSON-ready values for a report. Reads no data.

    Hub sources give the repository, config, revision, data file and column; ``builtin`` the stdlib
    location and Python version; a local source its absolute path and files.
    """
    checked_split = _check_split(split)
    resolved = _resolve(source)
    description: dict[str, object] = {"name": source, "split": checked_split}
    if isinstance(resolved, HubSource):
        hub_split, files = _hub_split_and_files(resolved, checked_split)
        description |= {
            "kind": "hub",
            "hub_id": resolved.hub_id,
            "config": resolved.config,
            "revision": resolved.revision,
            "hub_split": hub_split,
            "data_files": files,
            "field": "instruction/input/output" if resolved.record_format == "alpaca" else resolved.field,
            "record_format": resolved.record_format,
            "rows": _rows_description(resolved, checked_split),
            "windowing": resolved.windowing,
        }
    elif isinstance(resolved, BuiltinSource):
        description |= {"kind": "builtin", "module": corpus.__name__, "windowing": resolved.windowing}
        if checked_split == "calibration":
            description |= {"path": str(corpus.stdlib_root()), "python": _python_version(), "rows": "train"}
        else:
            description |= {"path": "slimgpt/assets/corpus/heldout.txt.gz", "rows": "held-out files"}
    elif isinstance(resolved, EnglishSource):  # issue 13
        from slimgpt import english

        description |= {**english.describe(checked_split), "windowing": resolved.windowing}
    else:
        local_files = _local_files(resolved.path)
        description |= {
            "kind": "local",
            "path": str(resolved.path.resolve()),
            "files": [file.name for file in local_files],
            "bytes": sum(file.stat().st_size for file in local_files),
            "rows": "all (a local source has no splits)",
            "windowing": resolved.windowing,
        }
    return description


# --- resolving a source name ------------------------------------------------------------------------


def _resolve(source: str) -> Source:
    """The named source, else a local path; registry names win over a same-named file (use ``./c4``)."""
    named = SOURCES.get(source.strip().lower())
    if named is not None:
        return named
    path = Path(source).expanduser()
    if path.exists():
        return LocalSource(path)
    if _looks_like_path(source):
        raise DataError(
            f"data path {source!r} does not exist: check the path, or pass one of the named sources "
            f"({', '.join(SOURCES)})"
        )
    raise DataError(
        f"unknown data source {source!r}: use one of {', '.join(SOURCES)}, or a local path "
        "(a .txt file, a .jsonl file with a 'text' field, or a directory of them)"
    )


def _looks_like_path(source: str) -> bool:
    return "/" in source or os.sep in source or source.startswith("~") or source.endswith(LOCAL_SUFFIXES)


def _check_split(split: str) -> Split:
    if split == "calibration":
        return "calibration"
    if split == "eval":
        return "eval"
    raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _check_windowing(windowing: str) -> Windowing:
    if windowing == "stream":
        return "stream"
    if windowing == "documents":
        return "documents"
    raise ConfigError(f"windowing must be one of {', '.join(WINDOWINGS)}, got {windowing!r}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")


def _documents(source: str, resolved: Source, split: Split) -> Sequence[str]:
    """The documents of one split; a Hub text column stays lazy so C4 rows are read only when sampled."""
    if isinstance(resolved, HubSource):
        return _hub_documents(source, resolved, split)
    if isinstance(resolved, BuiltinSource):
        return corpus.train_documents() if split == "calibration" else [corpus.heldout_text()]
    if isinstance(resolved, EnglishSource):  # issue 13
        from slimgpt import english

        return english.documents(split)
    return _read_local(resolved.path)


# --- local files ------------------------------------------------------------------------------------


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise DataError(
                f"directory {str(path)!r} holds no .txt or .jsonl files: put the text in .txt files, "
                'or in .jsonl files with one {"text": ...} object per line'
            )
        return files
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(
            f"{str(path)!r} is not a .txt or .jsonl file: convert it to plain text (.txt) or to JSON "
            "lines with a 'text' field (.jsonl)"
        )
    return [path]


def _read_local(path: Path) -> list[str]:
    documents: list[str] = []
    for file in _local_files(path):
        if file.suffix.lower() == ".jsonl":
            documents.extend(_read_jsonl(file))
        else:
            documents.append(file.read_text(encoding="utf-8", errors="replace"))
    logger.info("read %d documents from %s", len(documents), path)
    return documents


def jsonl_objects(file: Path, example: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line of a ``.jsonl`` file as ``(where, object)``; ``where`` names file and line.

    A line that is not a JSON object is a one-line DataError; ``example`` shows the object expected.
    """
    with file.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{str(file)!r} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not valid JSON ({error.msg}): write one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{where} is not a JSON object: write one {example} object per line")
            yield where, record


def _read_jsonl(file: Path) -> list[str]:
    texts: list[str] = []
    for where, record in jsonl_objects(file, '{"text": ...}'):
        if "text" not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise DataError(f"{where} has no 'text' field (fields: {fields}): put each document in a 'text' field")
        if not isinstance(record["text"], str):
            raise DataError(f"{where} has a 'text' field that is not a string: store the document as text")
        texts.append(record["text"])
    return texts


# --- Hugging Face Hub -------------------------------------------------------------------------------


def _hub_split_and_files(hub: HubSource, split: Split) -> tuple[str, str | None]:
    if split == "calibration":
        return hub.calibration_split, hub.calibration_files
    return hub.eval_split, hub.eval_files


def _rows_description(hub: HubSource, split: Split) -> str:
    if hub.heldout_fraction > 0:
        held = f"last {hub.heldout_fraction:.0%}"
        return f"all but the {held}" if split == "calibration" else f"the {held} (held back from calibration)"
    if split == "eval" and hub.eval_documents is not None:
        return f"first {hub.eval_documents}"
    return "all"


def _hub_label(hub: HubSource, files: str | None) -> str:
    """``id/config@revision:file``, the way the message and the cache name it."""
    label = hub.hub_id + (f"/{hub.config}" if hub.config else "") + (f"@{hub.revision}" if hub.revision else "")
    return label + (f":{files}" if files else "")


def _hub_documents(name: str, hub: HubSource, split: Split) -> Sequence[str]:
    hub_split, files = _hub_split_and_files(hub, split)
    dataset = _load_hub_split(name, hub, hub_split, files)
    if hub.heldout_fraction > 0:
        dataset = dataset.select(_heldout_range(len(dataset), hub.heldout_fraction, split))
    if split == "eval" and hub.eval_documents is not None:
        dataset = dataset.select(range(min(len(dataset), hub.eval_documents)))
    if hub.record_format == "alpaca":
        _require_columns(name, dataset.column_names, ("instruction", "output"))
        return [_format_alpaca(record) for record in dataset]
    _require_columns(name, dataset.column_names, (hub.field,))
    column: Sequence[str] = dataset[hub.field]  # a lazy datasets.Column: rows are read on access
    return column


def _heldout_range(rows: int, fraction: float, split: Split) -> range:
    """Rows ``split`` may read of a one-split dataset: eval the last ``fraction``, calibration the rest.

    At least one row is held back, and the boundary depends only on the row count, so calibration can
    never see an eval row.
    """
    heldout = max(1, math.ceil(rows * fraction))
    if heldout >= rows:
        raise DataError(f"a dataset of {rows} rows is too small to hold back {fraction:.0%} for eval: pass more data")
    return range(rows - heldout, rows) if split == "eval" else range(rows - heldout)


def _require_columns(name: str, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [column for column in required if column not in columns]
    if missing:
        raise DataError(
            f"dataset {name!r} has no {', '.join(map(repr, missing))} column "
            f"(columns: {', '.join(columns)}): the Hub copy changed; {LOCAL_HINT}"
        )


def _format_alpaca(record: Mapping[str, Any]) -> str:
    """One Alpaca record as one document in the standard Stanford Alpaca prompt (no Input if it is empty)."""
    fields = {key: str(record.get(key) or "").strip() for key in ("instruction", "input", "output")}
    template = ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT_NO_INPUT
    return template.format(**fields)


def _load_hub_split(name: str, hub: HubSource, hub_split: str, files: str | None) -> Any:
    """``datasets.load_dataset`` for one split, failing in seconds with a one-line ``DataError``.

    Offline with nothing cached: fail before calling it. Online: one short probe first, because a
    closed network otherwise costs huggingface_hub's retries (23 s to over a minute) and a traceback.
    Returns a ``datasets.Dataset``.
    """
    label = _hub_label(hub, files)
    cache_dir = _datasets_cache_dir()
    cached = _in_datasets_cache(hub.hub_id, cache_dir)
    if _hub_offline():
        if not cached:
            raise DataError(
                f"dataset {name!r} ({label}) is not in the local Hugging Face cache ({cache_dir}) and the "
                f"Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): {LOCAL_HINT}, or download it "
                "once with network (HF_DATASETS_CACHE=... to choose where)"
            )
    else:
        _check_hub_reachable(name, label, cached)

    from datasets import load_dataset

    logger.info("loading dataset %r (%s), split %s", name, label, hub_split)
    try:
        return load_dataset(
            hub.hub_id,
            hub.config,
            split=hub_split,
            data_files={hub_split: files} if files else None,
            revision=hub.revision,
            cache_dir=str(cache_dir),
        )
    except Exception as error:  # datasets raises many types here; all mean "this data could not be read"
        raise DataError(
            f"could not load dataset {name!r} ({label}): {_one_line(error)}: check the network and "
            f"disk space, or {LOCAL_HINT}"
        ) from error


def _check_hub_reachable(name: str, label: str, cached: bool) -> None:
    """Raise ``DataError`` unless the Hub endpoint answers within ``HUB_PROBE_TIMEOUT_S`` (any status)."""
    from datasets import config
    from huggingface_hub.utils import get_session

    endpoint = config.HF_ENDPOINT
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # any failure to get an answer means unreachable, whatever the transport
        fix = "set HF_HUB_OFFLINE=1 to use the cached copy" if cached else LOCAL_HINT
        raise DataError(
            f"cannot reach the Hugging Face Hub at {endpoint} to load dataset {name!r} ({label}): "
            f"{_one_line(error)}: check the network, or {fix}"
        ) from error


def _hub_offline() -> bool:
    """Offline as the user asked now (environment), or as datasets decided when it was imported."""
    variables = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(variable, "").upper() in _TRUE_VALUES for variable in variables):
        return True
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def _datasets_cache_dir() -> Path:
    """The datasets cache as the environment names it now (read per call, not at import)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    from datasets import config

    return Path(config.HF_DATASETS_CACHE).expanduser()


def _in_datasets_cache(hub_id: str, cache_dir: Path) -> bool:
    """Whether datasets has a prepared copy of ``hub_id``: the directory layout its offline loader reads."""
    from datasets.naming import camelcase_to_snakecase

    parts = hub_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = cache_dir / "___".join(parts)
    return any(path.is_dir() for path in root.glob("*/*/*"))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _python_version() -> str:
    import platform

    return platform.python_version()


# --- tokens and windows -----------------------------------------------------------------------------


def _encode(tokenizer: PreTrainedTokenizerBase, texts: str | list[str]) -> Any:
    """Token ids without special tokens. ``verbose=False`` silences the "longer than model_max_length"
    warning, which does not apply here: windows are cut to ``seqlen`` afterwards."""
    return tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]


def _encode_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> torch.Tensor:
    """The documents joined by a blank line, tokenized once: a LongTensor [tokens]."""
    text = corpus.DOC_SEPARATOR.join(documents)
    stream = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    logger.info("tokenized %d documents (%d characters) into %d tokens", len(documents), len(text), stream.numel())
    return stream


def _document_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    source: str,
    nsamples: int,
    seqlen: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One window per document longer than ``seqlen`` tokens, documents in seeded random order."""
    order: list[int] = torch.randperm(len(documents), generator=generator).tolist()
    windows: list[torch.Tensor] = []
    for batch_start in range(0, len(order), DOCUMENT_BATCH):
        batch = order[batch_start : batch_start + DOCUMENT_BATCH]
        for ids in _encode(tokenizer, [documents[index] for index in batch]):
            if len(ids) <= seqlen:
                continue
            start = int(torch.randint(0, len(ids) - seqlen + 1, (1,), generator=generator))
            windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
            if len(windows) == nsamples:
                return torch.stack(windows)  # [nsamples, seqlen]
    raise DataError(
        f"calibration source {source!r} has {len(windows)} documents longer than {seqlen} tokens "
        f"(of {len(documents)} documents) but {nsamples} samples need {nsamples} such documents: "
        "pass fewer --nsamples, a shorter --seqlen, or more data"
    )
