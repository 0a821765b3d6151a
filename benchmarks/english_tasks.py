"""Zero-shot English tasks for a real pretrained model, cut from the EVAL chapters of ``slimgpt.data.english`` only.

The code tasks (``benchmarks/tasks.py``) suit the built-in models trained on Python; a pretrained model
such as SmolLM2-135M is measured on English. Two tasks in lm-eval's own format, each ``DEFAULT_ITEMS``
items from the eval chapters of the shipped World English Bible (never from a calibration chapter):

- ``english-lastword``: LAMBADA-style. A passage of 30-150 words ending in a sentence whose last word
  is cut off; as in LAMBADA the word also occurs earlier in the passage, so the passage, not the last
  sentence alone, is the clue. slimgpt's harness scores multiple-choice tasks (acc / acc_norm), so the
  word is chosen among 4: the true one and 3 distractors that grammar alone cannot rule out. Each
  distractor is a word of the same passage (else of the same chapter) that (a) is capitalised like the
  answer, has 4+ letters and is no function word ("with", "them"), (b) is attested in the whole corpus
  right after the word (or punctuation mark) that precedes the gap ("basins of gold" licenses "of temple"
  only if "of temple" occurs somewhere), and (c) is the nearest in corpus frequency to the answer among
  those. So every choice is passage vocabulary that fits the slot's syntax, and only the meaning of the
  passage tells them apart. (The first version took any 3 other words of the passage; SmolLM2-135M
  scored 93% on it, near the ceiling.)
  No word is the answer of more than ``MAX_WORD_SHARE`` of the items (``Yahweh`` would otherwise be a
  fifth of them). Chance 25%.
- ``english-continuation``: a passage of 2+ sentences (30-120 words) and 4 candidate next sentences:
  the true one and 3 of similar length (within 25% in characters) from other eval chapters of the same
  book where it has enough, else of any book. Chance 25%.

No chapter gives more than ``PER_CHAPTER`` items of a task (``LASTWORD_PER_CHAPTER`` for lastword);
items are in a seeded random order, so lm-eval's ``--limit N`` (the first N items) is a fair sample.
Everything is seeded: the same corpus gives byte-identical files. lm-eval needs absolute ``data_files``
paths, so the YAMLs are written at run time (``write_task_yamls``; ``--yamls DIR`` below) into a folder
to pass as ``slimgpt eval --tasks-dir``.

    python benchmarks/english_tasks.py               # rewrite benchmarks/tasks_english/*.jsonl
    python benchmarks/english_tasks.py --check       # fail if the committed files differ from a fresh build
    python benchmarks/english_tasks.py --yamls DIR   # write the lm-eval YAMLs for --tasks-dir DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slimgpt.data.english as english

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import tasks as code_tasks  # the lm-eval YAML writer both task sets use

TASKS_DIR = Path(__file__).resolve().parent / "tasks_english"
TASK_NAMES = ("english-lastword", "english-continuation")
CHANCE_NOTE = {"english-lastword": "25%", "english-continuation": "25%"}
DEFAULT_ITEMS = 400
SEED = 4321
PER_CHAPTER = 3
LASTWORD_PER_CHAPTER = 4  # fewer passages have 3 words that fit the slot
MAX_WORD_SHARE = 0.02
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z(])|(?<=[.!?][\"'])\s+(?=[\"'A-Z(])")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{4,})([.!?,;:\"')]*)$", re.DOTALL)
_WORD = re.compile(r"\b[A-Za-z]{4,}\b")
# Function words are neither answers nor distractors: grammar alone would rule them in or out.
FUNCTION_WORDS = frozenset((
    "about", "after", "also", "because", "been", "before", "being", "could", "does", "down", "even", "every",
    "from", "have", "into", "just", "like", "made", "make", "many", "more", "most", "much", "must", "only", "other",
    "over", "said", "shall", "should", "some", "such", "than", "that", "their", "them", "then", "there", "these",
    "they", "this", "those", "through", "unto", "upon", "very", "were", "what", "when", "where", "which", "while",
    "will", "with", "would", "your", "yours"
))


def sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def _words(text: str) -> int:
    return len(text.split())


def _passage(parts: list[str], end: int, low: int, high: int) -> str | None:
    """The sentences just before ``end`` holding ``low``-``high`` words (at least 2 sentences), or None."""
    for start in range(end - 2, -1, -1):
        size = _words(" ".join(parts[start:end]))
        if size > high:
            return None
        if size >= low:
            return " ".join(parts[start:end])
    return None


def _take(candidates: list[dict[str, Any]], n_items: int, rng: random.Random, key: str | None = None,
          key_cap: int | None = None, per_chapter_cap: int = PER_CHAPTER) -> list[dict[str, Any]]:
    """``n_items`` candidates in seeded order, at most ``per_chapter_cap`` per chapter (and ``key_cap`` per ``key``)."""
    order = list(candidates)
    rng.shuffle(order)
    per_chapter: dict[str, int] = {}
    per_key: dict[str, int] = {}
    taken = []
    for item in order:
        value = str(item.get(key, "")).lower() if key else ""
        if per_chapter.get(item["source"], 0) >= per_chapter_cap or (key_cap and per_key.get(value, 0) >= key_cap):
            continue
        per_chapter[item["source"]] = per_chapter.get(item["source"], 0) + 1
        per_key[value] = per_key.get(value, 0) + 1
        taken.append(item)
        if len(taken) == n_items:
            break
    if len(taken) < n_items:
        raise SystemExit(f"only {len(taken)} items could be cut (need {n_items}): lower --items")
    taken.sort(key=lambda item: (item["source"], item["sentence"]))
    rng.shuffle(taken)
    return [{"id": f"{i:04d}", **item} for i, item in enumerate(taken)]


def _slot_key(token: str) -> str:
    """What licenses the next word: the preceding word (lower case), or its final punctuation mark."""
    return token.lower() if token[-1].isalnum() else token[-1]


def _bare(token: str) -> str:
    return token.strip(".,;:!?\"'()[]").lower()


@dataclass(frozen=True)
class Vocabulary:
    """Word frequencies and attested (slot, word) bigrams over the whole corpus (both splits)."""

    counts: Counter[str]
    bigrams: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, texts: Sequence[str]) -> Vocabulary:
        counts: Counter[str] = Counter()
        bigrams: set[tuple[str, str]] = set()
        for text in texts:
            tokens = text.split()
            counts.update(_bare(token) for token in tokens)
            bigrams.update((_slot_key(a), _bare(b)) for a, b in itertools.pairwise(tokens))
        return cls(counts, frozenset(bigrams))

    def distractors(self, word: str, slot: str, pools: Sequence[Sequence[str]], n: int = 3) -> list[str] | None:
        """``n`` words of the first pool(s) that fit after ``slot``, nearest to ``word`` in log frequency."""
        def fits(other: str) -> bool:
            return (other.lower() != word.lower() and other[0].isupper() == word[0].isupper()
                    and other.lower() not in FUNCTION_WORDS and (slot, other.lower()) in self.bigrams)

        target = math.log(self.counts[word.lower()] + 1)
        chosen: list[str] = []
        for pool in pools:
            fitting = sorted({w for w in pool if fits(w)} - set(chosen),
                             key=lambda w: (abs(math.log(self.counts[w.lower()] + 1) - target), w))
            chosen += fitting[: n - len(chosen)]
            if len(chosen) == n:
                return chosen
        return None


def lastword_items(chapters: Sequence[english.Chapter], n_items: int, seed: int,
                   vocabulary: Vocabulary | None = None) -> list[dict[str, Any]]:
    """LAMBADA-style: the last word of a passage (which occurs earlier in it) among 3 distractors that fit the slot."""
    rng = random.Random(seed)
    vocabulary = vocabulary or Vocabulary.of([chapter.text for chapter in english.chapters()])
    candidates = []
    for chapter in chapters:
        parts = sentences(chapter.text)
        chapter_words = _WORD.findall(chapter.text)
        for index in range(1, len(parts)):
            match = _LAST_WORD.match(parts[index])
            if match is None:
                continue
            head, word = match.group(1), match.group(2)
            if word.lower() in FUNCTION_WORDS:
                continue
            before = _passage(parts, index, 30, 130)
            if before is None or _words(before + " " + head) > 150:
                continue
            context = before + " " + head
            if re.search(rf"\b{re.escape(word)}\b", before) is None:
                continue
            others = vocabulary.distractors(word, _slot_key(head.split()[-1]), [_WORD.findall(context), chapter_words])
            if others is not None:
                candidates.append({"source": chapter.name, "sentence": index, "context": context, "word": word,
                                   "others": others})
    cap = max(1, math.floor(MAX_WORD_SHARE * n_items))
    items = _take(candidates, n_items, rng, key="word", key_cap=cap, per_chapter_cap=LASTWORD_PER_CHAPTER)
    for item in items:
        word, others = item.pop("word"), item.pop("others")
        choices = [" " + word, *(" " + w for w in others)]
        rng.shuffle(choices)
        item["choices"] = choices
        item["label"] = choices.index(" " + word)
    return items


def continuation_items(chapters: Sequence[english.Chapter], n_items: int, seed: int) -> list[dict[str, Any]]:
    """Choose a passage's true next sentence among 4 of similar length; distractors from other chapters."""
    rng = random.Random(seed)
    split = [(chapter, sentences(chapter.text)) for chapter in chapters]
    pool = [(chapter.book, chapter.name, sentence) for chapter, parts in split for sentence in parts
            if 8 <= _words(sentence) <= 40]
    candidates = []
    for chapter, parts in split:
        for index in range(2, len(parts)):
            if not 8 <= _words(parts[index]) <= 40:
                continue
            context = _passage(parts, index, 30, 120)
            if context is not None:
                candidates.append({"source": chapter.name, "book": chapter.book, "sentence": index,
                                   "context": context, "true": parts[index]})
    items = _take(candidates, n_items, rng)
    for item in items:
        true, book = item.pop("true"), item.pop("book")
        width = 0.25 * len(true)
        near = [(b, s) for b, name, s in pool if name != item["source"] and abs(len(s) - len(true)) <= width
                and s != true]
        same_book = sorted({s for b, s in near if b == book})
        others = same_book if len(same_book) >= 3 else sorted({s for _, s in near})
        choices = [" " + true, *(" " + s for s in rng.sample(others, 3))]
        rng.shuffle(choices)
        item["choices"] = choices
        item["label"] = choices.index(" " + true)
    return items


def build_tasks(n_items: int = DEFAULT_ITEMS, seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    chapters = english.split_chapters("eval")
    return {"english-lastword": lastword_items(chapters, n_items, seed),
            "english-continuation": continuation_items(chapters, n_items, seed + 1)}


def _jsonl(items: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def write_tasks(directory: Path = TASKS_DIR, n_items: int = DEFAULT_ITEMS, seed: int = SEED) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in build_tasks(n_items, seed).items():
        paths[name] = directory / f"{name}.jsonl"
        tmp = paths[name].with_suffix(".tmp")
        tmp.write_text(_jsonl(items), encoding="utf-8")
        tmp.replace(paths[name])
    return paths


def write_task_yamls(destination: Path, data_dir: Path = TASKS_DIR, names: Sequence[str] = TASK_NAMES) -> Path:
    """lm-eval YAMLs for ``names`` in ``destination`` (the code tasks' writer, on this task set's data)."""
    return code_tasks.write_task_yamls(destination, data_dir, names)


def task_chance(data_dir: Path = TASKS_DIR, limit: int | None = None) -> dict[str, float]:
    """Chance accuracy of each task over its first ``limit`` items (lm-eval's ``--limit``)."""
    return code_tasks.task_chance(data_dir, TASK_NAMES, limit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TASKS_DIR)
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="items per task")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the files in --out")
    parser.add_argument("--yamls", type=Path, help="write lm-eval YAMLs into this folder (for --tasks-dir)")
    args = parser.parse_args(argv)
    if args.yamls:
        print(write_task_yamls(args.yamls, args.out))
        return 0
    if args.check:
        stale = [name for name, items in build_tasks(args.items, args.seed).items()
                 if not (args.out / f"{name}.jsonl").exists()
                 or (args.out / f"{name}.jsonl").read_text(encoding="utf-8") != _jsonl(items)]
        print("up to date" if not stale else f"stale: {', '.join(stale)}")
        return 1 if stale else 0
    for name, path in write_tasks(args.out, args.items, args.seed).items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{name}: {count} items, chance {CHANCE_NOTE[name]}, {path.stat().st_size:,} bytes -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
