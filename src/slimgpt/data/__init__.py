"""Calibration and evaluation data: named sources, local files, and the token windows cut from them.

SlimGPT estimates each layer's Hessian from calibration activations, so the calibration windows are
part of the method, not a detail: the paper draws 256 random 2048-token windows from the first C4
shard with seed 0, and reports WikiText-2 perplexity on non-overlapping 128- and 2048-token windows.
This package turns a source name the user types (``c4``, ``wikitext2``, ``ptb``, ``alpaca``,
``gpt4-alpaca``, ``builtin``) or a local path into those windows, with the same protocol every time.

Three kinds of source, one interface:

- Hub datasets, described as data in ``SOURCES`` (``sources.py``: id, config, files, split, field) so
  that a report can quote exactly what was read (``describe_source``). ``hub.py`` loads them with the
  released ``datasets`` package, which keeps its own on-disk cache.
- ``builtin``: ``slimgpt.corpus``, the Python standard library's source. It exists offline on every
  machine, so the tool and its tests always have data.
- A local ``.txt`` file, ``.jsonl`` file (one object per line with a ``text`` field), or a directory of
  them (``local.py``). This is the answer for offline users: the error messages point to it.

``documents.py`` gives a split's documents and describes them; ``windows.py`` cuts the token windows.
Every problem a user can fix (unknown name, missing file, Hub offline or unreachable, too little text)
is a one-line ``DataError`` raised before any pruning work.
"""

from slimgpt.data.documents import check_available, describe_source, load_documents, source_documents
from slimgpt.data.local import jsonl_objects
from slimgpt.data.sources import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    LOCAL_HINT,
    LOCAL_SUFFIXES,
    SOURCES,
    SPLITS,
    WINDOWINGS,
    BuiltinSource,
    HubSource,
    LocalSource,
    Source,
    Split,
    Windowing,
    alpaca_fields,
    resolve_source,
)
from slimgpt.data.windows import calibration_windows, eval_windows

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "LOCAL_HINT",
    "LOCAL_SUFFIXES",
    "SOURCES",
    "SPLITS",
    "WINDOWINGS",
    "BuiltinSource",
    "HubSource",
    "LocalSource",
    "Source",
    "Split",
    "Windowing",
    "alpaca_fields",
    "calibration_windows",
    "check_available",
    "describe_source",
    "eval_windows",
    "jsonl_objects",
    "load_documents",
    "resolve_source",
    "source_documents",
]
