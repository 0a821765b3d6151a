"""Local text: a ``.txt`` file, a ``.jsonl`` file (one object per line with a ``text`` field), or a directory.

This is the answer for offline users: the Hub error messages point to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimgpt.data.sources import LOCAL_SUFFIXES
from slimgpt.errors import DataError

logger = logging.getLogger(__name__)


def local_files(path: Path) -> list[Path]:
    """The files a local source reads: the file itself, or a directory's sorted ``.txt``/``.jsonl`` files."""
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


def read_local(path: Path) -> list[str]:
    """The documents of a local source: a ``.txt`` file is one document, a ``.jsonl`` line is one."""
    documents: list[str] = []
    for file in local_files(path):
        if file.suffix.lower() == ".jsonl":
            documents.extend(_read_jsonl(file))
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.count("\ufffd") > max(16, len(text) // 100):  # binary or another encoding, not text
                raise DataError(f"{file} is not UTF-8 text (over 1% undecodable bytes): pass plain text files")
            documents.append(text)
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
