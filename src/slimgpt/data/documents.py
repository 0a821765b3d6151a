"""The documents of a source's split, and where they come from (for a report)."""

from __future__ import annotations

import platform
from collections.abc import Sequence

import slimgpt.corpus as corpus
import slimgpt.data.english as english
from slimgpt.data.hub import check_hub_available, hub_documents, hub_split_and_files, rows_description
from slimgpt.data.local import local_files, read_local
from slimgpt.data.sources import BuiltinSource, EnglishSource, HubSource, Source, Split, check_split, resolve_source


def load_documents(source: str, split: str = "calibration") -> list[str]:
    """The documents of ``source`` for ``split`` ("calibration": a train split; "eval": a test split).

    A local path has no splits: both return all of its documents (a ``.txt`` file is one document, a
    ``.jsonl`` line is one document, a directory is its sorted ``.txt``/``.jsonl`` files).
    """
    checked_split = check_split(split)
    return list(source_documents(source, resolve_source(source), checked_split))


def source_documents(source: str, resolved: Source, split: Split) -> Sequence[str]:
    """The documents of one split; a Hub text column stays lazy so C4 rows are read only when sampled."""
    if isinstance(resolved, HubSource):
        return hub_documents(source, resolved, split)
    if isinstance(resolved, BuiltinSource):
        return corpus.train_documents() if split == "calibration" else [corpus.heldout_text()]
    if isinstance(resolved, EnglishSource):
        return english.documents(split)
    return read_local(resolved.path)


def check_available(source: str, split: str = "calibration") -> None:
    """Fail now, with a one-line ``DataError``, if ``split`` of ``source`` cannot be read: an unknown name,
    a missing or unreadable local path, or a Hub dataset that is neither cached (offline) nor reachable.
    Reads a local source whole; for a Hub source it only looks at the cache or probes the Hub."""
    checked_split = check_split(split)
    resolved = resolve_source(source)
    if isinstance(resolved, HubSource):
        check_hub_available(source, resolved, checked_split)
    elif not isinstance(resolved, (BuiltinSource, EnglishSource)):
        read_local(resolved.path)


def describe_source(source: str, split: str = "calibration") -> dict[str, object]:
    """Where ``split`` of ``source`` comes from, as JSON-ready values for a report. Reads no data.

    Hub sources give the repository, config, revision, data file and column; ``builtin`` the stdlib
    location and Python version; a local source its absolute path and files.
    """
    checked_split = check_split(split)
    resolved = resolve_source(source)
    description: dict[str, object] = {"name": source, "split": checked_split}
    if isinstance(resolved, HubSource):
        hub_split, files = hub_split_and_files(resolved, checked_split)
        description |= {
            "kind": "hub",
            "hub_id": resolved.hub_id,
            "config": resolved.config,
            "revision": resolved.revision,
            "hub_split": hub_split,
            "data_files": files,
            "field": "instruction/input/output" if resolved.record_format == "alpaca" else resolved.field,
            "record_format": resolved.record_format,
            "rows": rows_description(resolved, checked_split),
            "windowing": resolved.windowing,
        }
    elif isinstance(resolved, BuiltinSource):
        description |= {"kind": "builtin", "module": corpus.__name__, "windowing": resolved.windowing}
        if checked_split == "calibration":
            description |= {"path": str(corpus.stdlib_root()), "python": platform.python_version(), "rows": "train"}
        else:
            description |= {"path": "slimgpt/assets/corpus/heldout.txt.gz", "rows": "held-out files"}
    elif isinstance(resolved, EnglishSource):
        description |= {**english.describe(checked_split), "windowing": resolved.windowing}
    else:
        files_read = local_files(resolved.path)
        description |= {
            "kind": "local",
            "path": str(resolved.path.resolve()),
            "files": [file.name for file in files_read],
            "bytes": sum(file.stat().st_size for file in files_read),
            "rows": "all (a local source has no splits)",
            "windowing": resolved.windowing,
        }
    return description
