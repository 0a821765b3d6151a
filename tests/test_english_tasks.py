"""The zero-shot English tasks (benchmarks/english_tasks.py): deterministic, eval chapters only, loadable by lm-eval."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import slimgpt.data.english as english

pytest.importorskip("lm_eval")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import english_tasks  # noqa: E402


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return english_tasks.build_tasks()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_committed_tasks_are_a_fresh_deterministic_build(built: dict[str, list[dict[str, Any]]]) -> None:
    assert english_tasks.build_tasks() == built
    for name, items in built.items():
        committed = (english_tasks.TASKS_DIR / f"{name}.jsonl").read_text(encoding="utf-8")
        assert committed == english_tasks._jsonl(items), f"{name}: run python benchmarks/english_tasks.py"
        assert len(items) == english_tasks.DEFAULT_ITEMS
        assert len({item["context"] for item in items}) == len(items)


def test_items_come_from_eval_chapters_only(built: dict[str, list[dict[str, Any]]]) -> None:
    texts = {chapter.name: chapter.text for chapter in english.split_chapters("eval")}
    calibration = {chapter.name for chapter in english.split_chapters("calibration")}
    for name, items in built.items():
        for item in items:
            assert item["source"] in texts and item["source"] not in calibration, (name, item["id"])
            text = texts[item["source"]]
            true = item["choices"][item["label"]]
            assert item["context"] + true in text
            assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
            if name == "english-lastword":  # the word occurs earlier; the other choices are words of the chapter
                assert true.strip() in item["context"]
                assert all(choice.strip() in text and len(choice.strip()) >= 4 for choice in item["choices"])
            else:
                assert all(choice not in text for i, choice in enumerate(item["choices"]) if i != item["label"])


@pytest.fixture(scope="module")
def vocabulary() -> english_tasks.Vocabulary:
    return english_tasks.Vocabulary.of([chapter.text for chapter in english.chapters()])


def test_lastword_distractors_fit_the_slot_and_mostly_come_from_the_passage(
    built: dict[str, list[dict[str, Any]]], vocabulary: english_tasks.Vocabulary
) -> None:
    items = built["english-lastword"]
    in_passage = 0
    for item in items:
        slot = english_tasks._slot_key(item["context"].split()[-1])
        true = item["choices"][item["label"]].strip()
        for index, choice in enumerate(item["choices"]):
            word = choice.strip()
            assert word.lower() not in english_tasks.FUNCTION_WORDS and word[0].isupper() == true[0].isupper()
            if index != item["label"]:  # attested right after the gap's preceding word somewhere in the corpus
                assert (slot, word.lower()) in vocabulary.bigrams, (item["id"], slot, word)
                in_passage += re.search(rf"\b{re.escape(word)}\b", item["context"]) is not None
    assert in_passage >= 0.75 * 3 * len(items)  # 80% of the distractors; the rest from the same chapter


def test_distractors_are_the_nearest_in_frequency(vocabulary: english_tasks.Vocabulary) -> None:
    pool = ["Moses", "bread", "water", "gold", "silver", "cattle", "mountain", "cities"]
    chosen = vocabulary.distractors("wine", "of", [pool])
    fitting = [w for w in pool if ("of", w.lower()) in vocabulary.bigrams and w[0].islower()]
    # "Moses" is capitalised; "of mountain" and "of cities" never occur (always "of the ...")
    assert "mountain" not in fitting and "cities" not in fitting and len(fitting) == 5
    assert chosen is not None and len(chosen) == 3 and set(chosen) <= set(fitting)

    def distance(word: str) -> float:
        return abs(math.log(vocabulary.counts[word] + 1) - math.log(vocabulary.counts["wine"] + 1))
    assert max(map(distance, chosen)) <= min(distance(w) for w in fitting if w not in chosen)
    assert vocabulary.distractors("wine", "of", [["Moses"]]) is None  # too few: the item is skipped


def test_labels_and_words_are_spread(built: dict[str, list[dict[str, Any]]]) -> None:
    labels = [item["label"] for item in built["english-continuation"]]
    assert all(60 <= labels.count(label) <= 140 for label in range(4))
    words = [item["choices"][item["label"]].strip().lower() for item in built["english-lastword"]]
    assert max(words.count(word) for word in set(words)) <= english_tasks.MAX_WORD_SHARE * len(words)
    assert english_tasks.task_chance() == {name: pytest.approx(0.25) for name in english_tasks.TASK_NAMES}


def test_tasks_load_through_lm_eval(tmp_path: Path) -> None:
    from slimgpt.evaluation import load_tasks

    directory = english_tasks.write_task_yamls(tmp_path / "yamls")
    suite = load_tasks(list(english_tasks.TASK_NAMES), directory)
    for name in english_tasks.TASK_NAMES:
        (task,) = suite.objects[name]
        docs = list(task.validation_docs())
        assert len(docs) == english_tasks.DEFAULT_ITEMS
        first = json.loads((english_tasks.TASKS_DIR / f"{name}.jsonl").read_text().splitlines()[0])
        assert task.doc_to_text(docs[0]) == first["context"] and task.doc_to_choice(docs[0]) == first["choices"]
