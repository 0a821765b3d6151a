"""The shipped English corpus (slimgpt.data.english): a deterministic, disjoint split; `--calib/--ppl english`."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

import slimgpt.data.english as english
from slimgpt.data import calibration_windows, describe_source, eval_windows, load_documents


def test_corpus_is_whole() -> None:
    chapters = english.chapters()
    assert len(chapters) == 1189 and len({c.book for c in chapters}) == 66
    assert chapters[0].name == "Genesis 1" and chapters[0].text.startswith("In the beginning God created")
    assert chapters[-1].name == "Revelation 22"
    assert all(c.text and "`" not in c.text and "  " not in c.text for c in chapters)
    assert not any(c.text[:3].strip().rstrip(".").isdigit() for c in chapters)  # verse numbers removed


def test_split_is_disjoint_and_covers_everything() -> None:
    calibration, evaluation = english.split_chapters("calibration"), english.split_chapters("eval")
    names = [c.name for c in english.chapters()]
    assert len(set(names)) == len(names)
    assert {c.name for c in calibration}.isdisjoint({c.name for c in evaluation})
    assert {c.name for c in calibration} | {c.name for c in evaluation} == set(names)
    assert set(english.documents("calibration")).isdisjoint(english.documents("eval"))
    # about EVAL_BUCKETS% of the chapters, spread over the whole Bible
    assert (len(calibration), len(evaluation)) == (947, 242)
    assert len({c.book for c in evaluation}) >= 40


def test_split_is_a_fixed_function_of_the_chapter_name() -> None:
    for chapter in english.chapters()[:200]:
        bucket = int(hashlib.sha1(chapter.name.encode()).hexdigest(), 16) % 100
        assert chapter.split == ("eval" if bucket < english.EVAL_BUCKETS else "calibration")
    assert english.split_of("Genesis", 1) == english.split_of("Genesis", 1)
    with pytest.raises(ValueError, match="split must be"):
        english.split_chapters("train")


def test_english_is_a_data_source(tokenizer: Any) -> None:
    assert load_documents("english", "eval") == english.documents("eval")
    assert load_documents("English", "calibration") == english.documents("calibration")
    first = calibration_windows(tokenizer, "english", nsamples=4, seqlen=64, seed=0)
    assert first.shape == (4, 64)
    assert calibration_windows(tokenizer, "english", nsamples=4, seqlen=64, seed=0).equal(first)
    windows = eval_windows(tokenizer, "english", 128, max_windows=3)
    assert windows.shape == (3, 128)
    described = describe_source("english", "eval")
    assert described["kind"] == "shipped" and "242 of 1189" in str(described["rows"])
    assert "public domain" in str(described["text"])
