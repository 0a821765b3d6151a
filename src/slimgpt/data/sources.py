"""The named data sources, as one table, and the rules that turn what a user types into a source.

Adding a source is one row of ``SOURCES``. A name not in the table is taken as a local path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from slimgpt.errors import ConfigError, DataError

Split = Literal["calibration", "eval"]
Windowing = Literal["stream", "documents"]

SPLITS: tuple[str, ...] = ("calibration", "eval")
WINDOWINGS: tuple[str, ...] = ("stream", "documents")
LOCAL_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")
LOCAL_HINT = "pass a local file (--calib PATH / --data PATH)"

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


def alpaca_fields(record: Mapping[str, Any]) -> dict[str, str]:
    """An Alpaca record's instruction, input and output, stripped, "" where absent or empty."""
    return {key: str(record.get(key) or "").strip() for key in ("instruction", "input", "output")}


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
class EnglishSource:
    """``slimgpt.data.english``: shipped English prose, calibration and eval chapters disjoint."""

    windowing: Windowing = "stream"


@dataclass(frozen=True)
class LocalSource:
    """A user's ``.txt`` / ``.jsonl`` file or directory of them. It has no splits: both read all of it."""

    path: Path
    windowing: Windowing = "stream"


Source = HubSource | BuiltinSource | LocalSource | EnglishSource

SOURCES: Mapping[str, HubSource | BuiltinSource | EnglishSource] = MappingProxyType(
    {
        # The paper's calibration set: the first shard of C4 "en". Its 356k documents are too many to
        # tokenize for 256 windows, so windows are sampled per document, as GPTQ does. GPTQ's C4
        # evaluation reads the first 1100 validation documents; so do we.
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
        "english": EnglishSource(),
    }
)


def resolve_source(source: str) -> Source:
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


def check_split(split: str) -> Split:
    if split == "calibration":
        return "calibration"
    if split == "eval":
        return "eval"
    raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def check_windowing(windowing: str) -> Windowing:
    if windowing == "stream":
        return "stream"
    if windowing == "documents":
        return "documents"
    raise ConfigError(f"windowing must be one of {', '.join(WINDOWINGS)}, got {windowing!r}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
