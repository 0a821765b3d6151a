"""Zero-shot code tasks for the built-in reference models, cut from the HELD-OUT stdlib split only.

The paper measures zero-shot accuracy on commonsense tasks (BoolQ, PIQA, ...), which a 6M-parameter
model trained on Python source cannot do above chance. These three multiple-choice tasks ask what such
a model can know, in lm-eval's own format, so that the paper's zero-shot columns have a counterpart:

- ``code-nextline``: up to 6 lines of a file, then the true next line among 4; the 3 distractors are
  lines of similar length from other held-out files, re-indented like the true one. Chance 25%.
- ``code-real-or-shuffled``: up to 4 lines of a file, then the true next line or the same line with
  two of its identifiers swapped (same characters, same length; a full shuffle of its tokens is too
  easy: the dense tiny-mha is 100% right on it). Chance 50%.
- ``code-closing``: a file cut just before a run of closing brackets; the true run or another run of
  the same length over ``)]}`` (3 choices for one bracket, 4 for longer runs). Chance about 29%.

Every item is cut from ``slimgpt.corpus.heldout_text()`` (the split the models never saw) and names its
source file and line, so a test can check that no item comes from a training file. The held-out text
is one string; ``heldout_files.json`` beside the tasks records which file each stretch of it is (path,
length, SHA-1), so the tasks are rebuilt identically on any Python version. Everything is seeded: the
same corpus gives byte-identical files.

lm-eval needs an absolute ``data_files`` path, so the YAMLs are not committed: ``write_task_yamls``
writes them (pointing at the committed jsonl files) into a folder chosen at run time.

    python benchmarks/tasks.py              # rewrite benchmarks/tasks/*.jsonl and the manifest
    python benchmarks/tasks.py --check      # fail if the committed files differ from a fresh build
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import keyword
import math
import random
import sys
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimgpt import corpus

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MANIFEST = "heldout_files.json"
TASK_NAMES = ("code-nextline", "code-real-or-shuffled", "code-closing")
DEFAULT_ITEMS = 400
SEED = 1234
# No file may give more than this share of a task's items: the held-out split holds a few long,
# repetitive files (codec tables, multiprocessing.managers) that would otherwise dominate.
MAX_FILE_SHARE = 0.12
CLOSERS = ")]}"

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
output_type: multiple_choice
validation_split: validation
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass(frozen=True)
class Document:
    """One held-out source file: its path relative to the stdlib root and its text."""

    path: str
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")


# --- the held-out documents ----------------------------------------------------------------------


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def build_manifest() -> list[dict[str, Any]]:
    """Path, length and hash of each held-out file of the local stdlib, checked against the shipped text.

    The shipped held-out text is these files joined by a blank line; a Python whose stdlib differs
    from the one the asset was built from cannot say where one file ends, and is refused.
    """
    root = corpus.stdlib_root()
    paths = corpus.stdlib_files("heldout")
    texts = corpus.read_documents(paths)
    if corpus.DOC_SEPARATOR.join(texts) != corpus.heldout_text():
        raise SystemExit(
            f"the local stdlib ({root}) is not the one slimgpt's held-out asset was built from: "
            f"use the committed {MANIFEST}, or Python 3.11.7"
        )
    return [
        {"path": path.relative_to(root).as_posix(), "chars": len(text), "sha1": _sha1(text)}
        for path, text in zip(paths, texts, strict=True)
    ]


def heldout_documents(manifest: Sequence[dict[str, Any]]) -> list[Document]:
    """Split ``corpus.heldout_text()`` into its files using the manifest's lengths, checking each hash."""
    text = corpus.heldout_text()
    documents = []
    offset = 0
    for index, entry in enumerate(manifest):
        if index:
            if text[offset : offset + len(corpus.DOC_SEPARATOR)] != corpus.DOC_SEPARATOR:
                raise ValueError(f"{MANIFEST}: no document separator before {entry['path']}")
            offset += len(corpus.DOC_SEPARATOR)
        piece = text[offset : offset + int(entry["chars"])]
        if _sha1(piece) != entry["sha1"]:
            raise ValueError(f"{MANIFEST}: {entry['path']} does not match the shipped held-out text")
        documents.append(Document(str(entry["path"]), piece))
        offset += int(entry["chars"])
    if offset != len(text):
        raise ValueError(f"{MANIFEST}: covers {offset} of {len(text)} characters of the held-out text")
    return documents


def load_manifest(directory: Path = TASKS_DIR) -> list[dict[str, Any]]:
    """The committed manifest, or one built from the local stdlib when none is committed yet."""
    path = directory / MANIFEST
    if path.exists():
        return list(json.loads(path.read_text())["files"])
    return build_manifest()


# --- line helpers ----------------------------------------------------------------------------------


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _is_code_line(line: str, low: int = 12, high: int = 80) -> bool:
    """A line worth predicting: of moderate length, with no comment.

    Commented lines are left out because the held-out codec tables (``'K'  #  0x004b -> LATIN CAPITAL
    LETTER K``) would otherwise make many items a pattern-copying exercise.
    """
    stripped = line.strip()
    return low <= len(stripped) <= high and "#" not in stripped


def _context(lines: list[str], index: int, max_lines: int, max_chars: int) -> str | None:
    """The up to ``max_lines`` lines before line ``index``, whole lines, without the last newline.

    The newline goes to the continuation (the choices start with it). lm-eval scores a continuation
    as the tokens of ``context + choice`` after those of ``context``; a boundary between a line's
    last character and a newline is a pre-token boundary of byte-level BPE, so no token straddles it,
    whereas ``"\n"`` + indentation is often one token. None when fewer than two of the lines hold
    code: the item would be a guess.
    """
    chosen: list[str] = []
    size = 0
    for line in reversed(lines[max(0, index - max_lines) : index]):
        if size + len(line) + 1 > max_chars:
            break
        chosen.append(line)
        size += len(line) + 1
    chosen.reverse()
    if sum(1 for line in chosen if line.strip() and not line.strip().startswith("#")) < 2:
        return None
    return "\n".join(chosen)


def _take(candidates: list[dict[str, Any]], n_items: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n_items`` candidates in a seeded random order, no file giving more than ``MAX_FILE_SHARE``."""
    order = list(candidates)
    rng.shuffle(order)
    cap = max(1, math.ceil(MAX_FILE_SHARE * n_items))
    per_file: dict[str, int] = {}
    taken = []
    for item in order:
        if per_file.get(item["source"], 0) >= cap:
            continue
        per_file[item["source"]] = per_file.get(item["source"], 0) + 1
        taken.append(item)
        if len(taken) == n_items:
            break
    return taken


def _numbered(items: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Items in a seeded random order, with an id each.

    lm-eval's ``--limit N`` evaluates the first N items, so any prefix must be a fair sample of the
    files and of the item kinds, not the first files in path order.
    """
    ordered = sorted(items, key=lambda item: (item["source"], item["line"], item["context"]))
    rng.shuffle(ordered)
    return [{"id": f"{i:04d}", **item} for i, item in enumerate(ordered)]


# --- the tasks ------------------------------------------------------------------------------------


def nextline_items(documents: Sequence[Document], n_items: int, seed: int) -> list[dict[str, Any]]:
    """Choose the true next line among 4; the 3 distractors come from other held-out files.

    Distractors have a stripped length within 20% of the true line's and are re-indented like it, so
    neither length nor indentation gives the answer away: only what the code says does.
    """
    rng = random.Random(seed)
    pool = [
        (document.path, line.strip())
        for document in documents
        for line in document.lines
        if _is_code_line(line)
    ]
    pool.sort(key=lambda entry: len(entry[1]))
    candidates: list[dict[str, Any]] = []
    for document in documents:
        lines = document.lines
        for index, line in enumerate(lines):
            if not _is_code_line(line):
                continue
            context = _context(lines, index, max_lines=6, max_chars=480)
            if context is None:
                continue
            candidates.append({"source": document.path, "line": index + 1, "context": context, "target": line})
    items = _numbered(_take(candidates, n_items, rng), rng)
    for item in items:
        target = item.pop("target")
        stripped, indent = target.strip(), _indent(target)
        width = max(3, round(0.2 * len(stripped)))
        near = sorted(
            {text for path, text in pool
             if path != item["source"] and abs(len(text) - len(stripped)) <= width and text != stripped}
        )
        distractors = ["\n" + indent + text for text in rng.sample(near, 3)]
        choices = ["\n" + target, *distractors]
        rng.shuffle(choices)
        item["choices"] = choices
        item["label"] = choices.index("\n" + target)
    return items


def _line_tokens(text: str) -> dict[int, list[tokenize.TokenInfo]] | None:
    """Python tokens of a file by line, or None if the file does not tokenize."""
    skip = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    by_line: dict[int, list[tokenize.TokenInfo]] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type not in skip:
                by_line.setdefault(token.start[0], []).append(token)
    except (tokenize.TokenError, SyntaxError):
        return None
    return by_line


def shuffled_line(line: str, tokens: list[tokenize.TokenInfo], rng: random.Random) -> str | None:
    """``line`` with two different identifiers swapped: same characters, same spacing, same length.

    Two identifiers, not a full shuffle: the dense tiny-mha tells a fully shuffled line (or one with
    any two tokens swapped) from the real one 99-100% of the time, which leaves no room to see pruning
    hurt. Swapping names keeps the line well-formed, so only what the names mean gives it away
    (``del self.dict[str(window)]`` against ``del window.dict[str(self)]``). None when the line has
    fewer than two distinct identifiers, a comment, or a token that spans lines.
    """
    if any(t.type == tokenize.COMMENT or t.start[0] != t.end[0] for t in tokens):
        return None
    strings = [t.string for t in tokens]
    names = [i for i, t in enumerate(tokens) if t.type == tokenize.NAME and not keyword.iskeyword(t.string)]
    if len({strings[i] for i in names}) < 2:
        return None
    first, second = rng.sample(names, 2)
    while strings[first] == strings[second]:
        first, second = rng.sample(names, 2)
    order = strings[:]
    order[first], order[second] = order[second], order[first]
    gaps = [line[tokens[i].end[1] : tokens[i + 1].start[1]] for i in range(len(tokens) - 1)]
    rebuilt = line[: tokens[0].start[1]] + "".join(
        s + g for s, g in zip(order, [*gaps, line[tokens[-1].end[1] :]], strict=True)
    )
    return rebuilt if rebuilt != line else None


def real_or_shuffled_items(documents: Sequence[Document], n_items: int, seed: int) -> list[dict[str, Any]]:
    """Tell the true next line from the same line with two identifiers swapped; both have the same length."""
    rng = random.Random(seed)
    candidates: list[dict[str, Any]] = []
    for document in documents:
        by_line = _line_tokens(document.text)
        if by_line is None:
            continue
        lines = document.lines
        for index, line in enumerate(lines):
            tokens = by_line.get(index + 1, [])
            if not _is_code_line(line) or not tokens or tokens[0].start[1] != len(_indent(line)):
                continue  # the line starts inside a bracket or string opened earlier
            context = _context(lines, index, max_lines=4, max_chars=320)
            if context is not None:
                candidates.append(
                    {"source": document.path, "line": index + 1, "context": context, "target": line,
                     "tokens": tokens}
                )
    rng.shuffle(candidates)
    usable = []
    for candidate in candidates:
        fake = shuffled_line(candidate["target"], candidate.pop("tokens"), rng)
        if fake is not None:
            usable.append({**candidate, "fake": fake})
    items = _numbered(_take(usable, n_items, rng), rng)
    for item in items:
        target, fake = item.pop("target"), item.pop("fake")
        label = rng.randrange(2)
        item["choices"] = ["\n" + target, "\n" + fake] if label == 0 else ["\n" + fake, "\n" + target]
        item["label"] = label
    return items


def closing_items(documents: Sequence[Document], n_items: int, seed: int) -> list[dict[str, Any]]:
    """Which run of closing brackets comes next: the file is cut just before a run of ``)]}`` tokens.

    The choices are the true run and up to 3 other runs of the same length over ``)]}`` (3 choices for
    a single bracket, 4 for longer runs; up to half of the items are longer runs). Brackets inside
    strings and comments are not tokens, so never cut points. Runs longer than 3 are not used.
    """
    rng = random.Random(seed)
    candidates: list[dict[str, Any]] = []
    for document in documents:
        by_line = _line_tokens(document.text)
        if by_line is None:
            continue
        lines = document.lines
        for row, tokens in sorted(by_line.items()):
            line = lines[row - 1]
            i = 0
            while i < len(tokens):
                if tokens[i].string not in CLOSERS or tokens[i].type != tokenize.OP:
                    i += 1
                    continue
                j = i
                while (j + 1 < len(tokens) and tokens[j + 1].string in CLOSERS
                       and tokens[j + 1].start == tokens[j].end):
                    j += 1
                run = "".join(t.string for t in tokens[i : j + 1])
                head = line[: tokens[i].start[1]]
                context = _context(lines, row - 1, max_lines=4, max_chars=320)
                # A letter or digit before the cut: byte-level BPE never merges it with a bracket, so
                # the choices are scored on their own tokens (see _context).
                if len(run) <= 3 and head[-1:].isalnum() and context is not None:
                    candidates.append({"source": document.path, "line": row, "context": context + "\n" + head,
                                       "run": run})
                i = j + 1
    # Runs of one bracket are most of the candidates and the easiest items: half of the items, at
    # most, are single brackets.
    longer = [item for item in candidates if len(item["run"]) > 1]
    taken = _take(longer, min(len(longer), n_items // 2), rng)
    single = [item for item in candidates if len(item["run"]) == 1]
    items = _numbered(taken + _take(single, n_items - len(taken), rng), rng)
    for item in items:
        run = item.pop("run")
        others = sorted(_runs(len(run)) - {run})
        choices = [run, *rng.sample(others, min(3, len(others)))]
        rng.shuffle(choices)
        item["choices"] = choices
        item["label"] = choices.index(run)
    return items


def _runs(length: int) -> set[str]:
    runs = {""}
    for _ in range(length):
        runs = {run + closer for run in runs for closer in CLOSERS}
    return runs


BUILDERS: dict[str, Callable[[Sequence[Document], int, int], list[dict[str, Any]]]] = {
    "code-nextline": nextline_items,
    "code-real-or-shuffled": real_or_shuffled_items,
    "code-closing": closing_items,
}


# --- files ----------------------------------------------------------------------------------------


def chance(items: Sequence[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform guess."""
    return sum(1 / len(item["choices"]) for item in items) / len(items)


def build_tasks(n_items: int = DEFAULT_ITEMS, seed: int = SEED,
                manifest: Sequence[dict[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every task's items, from the held-out documents the manifest describes."""
    documents = heldout_documents(manifest if manifest is not None else load_manifest())
    return {name: builder(documents, n_items, seed + index) for index, (name, builder) in enumerate(BUILDERS.items())}


def _jsonl(items: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def write_tasks(directory: Path = TASKS_DIR, n_items: int = DEFAULT_ITEMS, seed: int = SEED) -> dict[str, Path]:
    """Write ``<task>.jsonl`` for every task and the manifest into ``directory``; return the jsonl paths."""
    manifest = load_manifest(directory)
    tasks = build_tasks(n_items, seed, manifest)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"source": "slimgpt.corpus.heldout_text()", "files": manifest}
    (directory / MANIFEST).write_text(json.dumps(header, indent=1) + "\n")
    paths = {}
    for name, items in tasks.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text(_jsonl(items), encoding="utf-8")
    return paths


def write_task_yamls(destination: Path, data_dir: Path = TASKS_DIR,
                     names: Sequence[str] = TASK_NAMES) -> Path:
    """lm-eval YAMLs for ``names`` in ``destination``, with absolute paths to the jsonl in ``data_dir``.

    The `datasets` cache goes to ``destination/datasets_cache``, so the user's cache is not touched and
    an edited jsonl is never read from a stale cache. Returns ``destination`` (for ``--tasks-dir``).
    """
    destination.mkdir(parents=True, exist_ok=True)
    cache = (destination / "datasets_cache").resolve()
    for name in names:
        data = (data_dir / f"{name}.jsonl").resolve()
        if not data.exists():
            raise FileNotFoundError(f"{data}: missing; run python benchmarks/tasks.py")
        (destination / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, cache=cache))
    return destination


def task_chance(data_dir: Path = TASKS_DIR, names: Sequence[str] = TASK_NAMES,
                limit: int | None = None) -> dict[str, float]:
    """Chance accuracy of each committed task, over its first ``limit`` items (lm-eval's ``--limit``)."""
    result = {}
    for name in names:
        text = (data_dir / f"{name}.jsonl").read_text(encoding="utf-8")
        result[name] = chance([json.loads(line) for line in text.splitlines()[:limit]])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TASKS_DIR)
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="items per task")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the files in --out")
    args = parser.parse_args(argv)
    if args.check:
        tasks = build_tasks(args.items, args.seed, load_manifest(args.out))
        stale = [name for name, items in tasks.items()
                 if not (args.out / f"{name}.jsonl").exists()
                 or (args.out / f"{name}.jsonl").read_text(encoding="utf-8") != _jsonl(items)]
        print("up to date" if not stale else f"stale: {', '.join(stale)}")
        return 1 if stale else 0
    paths = write_tasks(args.out, args.items, args.seed)
    chances = task_chance(args.out)
    for name, path in paths.items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{name}: {count} items, chance {100 * chances[name]:.1f}%, {path.stat().st_size:,} bytes -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
