"""The zero-shot English tasks (benchmarks/english_tasks.py): deterministic, eval chapters only, loadable by lm-eval."""

from __future__ import annotations

import json
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
            if name == "english-lastword":  # the word occurs earlier; so do the other choices
                assert all(choice.strip() in item["context"] and len(choice.strip()) >= 4 for choice in item["choices"])
            else:
                assert all(choice not in text for i, choice in enumerate(item["choices"]) if i != item["label"])


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
