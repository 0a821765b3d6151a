"""Training examples: instruction records (Alpaca style) or raw text, tokenized for one run.

Instruction records (Alpaca's instruction / input / output, from the Hub or a local ``.jsonl``) become
one example each, formatted with the Stanford Alpaca template of ``slimgpt.data``; with
``response_only`` the prompt tokens get label -100. Raw text (``builtin``, other named sources, ``.txt``,
``.jsonl`` with a ``text`` field, a directory) is tokenized as one stream and cut into ``max_length``
windows with the plain causal-LM loss.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import slimgpt.corpus as corpus
import slimgpt.data as data_sources
import slimgpt.data.hub as hub_sources
from slimgpt.errors import DataError
from slimgpt.finetune.config import FinetuneConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
INSTRUCTION_FIELDS = ("instruction", "output")
TOKENIZE_BATCH = 256  # documents per tokenizer call: large enough for the fast tokenizer's threads


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids`` [t] and ``labels`` [t] (-100 where no loss is taken)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def targets(self) -> int:
        """Tokens that contribute to the loss (a label is predicted from the tokens before it)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class TrainingData:
    """The tokenized examples and where they came from (JSON-ready, for the provenance file)."""

    examples: list[Example]
    kind: str  # "instruction" or "text"
    description: dict[str, Any]
    dropped: int = 0  # instruction records whose response did not fit in max_length

    def fingerprint(self) -> str:
        """sha256 of every token and label: a resumed run must see exactly the same data."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(example.input_ids.numpy().tobytes())
            digest.update(example.labels.numpy().tobytes())
        return digest.hexdigest()


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Stanford Alpaca prompt up to and including ``### Response:\\n`` (the template of slimgpt.data)."""
    template = data_sources.ALPACA_PROMPT_WITH_INPUT if input_text else data_sources.ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input_text, output="")


def split_record(record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) of one Alpaca record, fields stripped as ``slimgpt.data`` formats them."""
    values = data_sources.alpaca_fields(record)
    return alpaca_prompt(values["instruction"], values["input"]), values["output"]


def instruction_example(tokenizer: Any, prompt: str, response: str, max_length: int,
                        response_only: bool = True) -> Example | None:
    """Tokenize ``prompt + response`` (+ EOS), truncated to ``max_length``; None if no target token is left.

    The full text is tokenized once (what the model sees at inference) and a token is a prompt token
    when it starts inside the prompt's characters (offset mapping), so a token that straddles the
    boundary is never trained on. BOS, if the tokenizer adds one, counts as prompt.
    """
    text = prompt + response
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids: list[int] = list(encoded["input_ids"])
    in_prompt = [start < len(prompt) for start, _ in encoded["offset_mapping"]]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
        in_prompt.append(False)
    ids, in_prompt = ids[:max_length], in_prompt[:max_length]
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    if response_only:
        labels[torch.tensor(in_prompt, dtype=torch.bool)] = IGNORE_INDEX
    example = Example(input_ids, labels)
    return example if example.targets > 0 else None


def text_examples(tokenizer: Any, documents: Sequence[str], max_length: int,
                  limit: int | None = None) -> list[Example]:
    """Documents joined by a blank line, tokenized without special tokens, cut into ``max_length`` windows.

    The tail shorter than a window is dropped. ``limit``: stop tokenizing once that many windows exist
    (a ``max_steps`` run on a large corpus need not tokenize all of it).
    """
    separator = corpus.DOC_SEPARATOR
    stream: list[int] = []
    for start in range(0, len(documents), TOKENIZE_BATCH):
        batch = [document + separator for document in documents[start : start + TOKENIZE_BATCH]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
        if limit is not None and len(stream) >= limit * max_length:
            break
    count = len(stream) // max_length
    if limit is not None:
        count = min(count, limit)
    windows = torch.tensor(stream[: count * max_length], dtype=torch.long).reshape(count, max_length)
    return [Example(window, window.clone()) for window in windows]


def check_data_source(source: str) -> dict[str, Any]:
    """Fail with a one-line ``DataError`` if ``source`` is unknown or missing; reads no data.

    Returns the source's description (``slimgpt.data.describe_source``) for the provenance file.
    """
    return data_sources.describe_source(source, "calibration")


def load_training_data(tokenizer: Any, config: FinetuneConfig) -> TrainingData:
    """The examples ``config.data`` describes, tokenized for ``config.max_length``.

    Named Hub instruction sets read the training rows of ``slimgpt.data`` (all but the held-out 5% that
    its eval split uses, so an Alpaca perplexity after fine-tuning is still on unseen records).
    """
    description = check_data_source(config.data)
    records = _instruction_records(config.data)
    if records is None:
        limit = config.max_steps * config.batch_size if config.max_steps is not None else None
        documents = data_sources.load_documents(config.data, "calibration")
        examples = text_examples(tokenizer, documents, config.max_length, limit)
        if not examples:
            raise DataError(f"data {config.data!r} has fewer than {config.max_length} tokens: pass more text "
                            "or a shorter --max-length")
        return TrainingData(examples, "text", description)
    examples, dropped = [], 0
    for record in records:
        example = instruction_example(tokenizer, *split_record(record), config.max_length, config.response_only)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise DataError(f"no record of {config.data!r} has a response within --max-length {config.max_length} "
                        "tokens: pass a longer --max-length")
    if dropped:
        logger.warning("dropped %d of %d records whose prompt fills --max-length %d", dropped, len(records),
                       config.max_length)
    return TrainingData(examples, "instruction", description, dropped)


def _instruction_records(source: str) -> list[dict[str, Any]] | None:
    """Alpaca-style records of ``source``, or None when it is raw text."""
    resolved = data_sources.resolve_source(source)
    if isinstance(resolved, data_sources.HubSource):
        if resolved.record_format != "alpaca":
            return None
        # slimgpt.data owns the Hub access (offline checks, cache, held-out rows, one-line errors).
        dataset = hub_sources.hub_rows(source, resolved, "calibration", INSTRUCTION_FIELDS)
        return [dict(record) for record in dataset]
    if isinstance(resolved, data_sources.LocalSource) and resolved.path.is_file() \
            and resolved.path.suffix.lower() == ".jsonl":
        return _jsonl_records(resolved.path)
    return None


def _jsonl_records(path: Path) -> list[dict[str, Any]] | None:
    """Records of an instruction ``.jsonl``; None if its first record is a ``text`` record (raw text)."""
    records: list[dict[str, Any]] = []
    for where, record in data_sources.jsonl_objects(path, "instruction"):
        if not records and "text" in record and "instruction" not in record:
            return None  # raw text records: slimgpt.data reads them
        missing = [key for key in INSTRUCTION_FIELDS if key not in record]
        if missing:
            raise DataError(f"{where} has no {', '.join(map(repr, missing))} field: write instruction records "
                            "as {\"instruction\", \"input\", \"output\"} (or raw text as {\"text\"})")
        records.append(record)
    if not records:
        raise DataError(f"{str(path)!r} holds no records: write one JSON object per line")
    return records


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [b, t]."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n], mask[row, :n], labels[row, :n] = example.input_ids, 1, example.labels
    return input_ids, mask, labels
