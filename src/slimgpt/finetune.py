"""LoRA recovery fine-tuning of a pruned model, merged back into a plain (pruned) checkpoint.

Pruning leaves a model that has lost some of what it knew; the paper recovers part of it with a short
LoRA run (method spec section 9, "Recovery"): rank 8, alpha 16, dropout 0.05 on the q, k, v, o, gate,
up and down projections, one epoch of Alpaca-cleaned, lr 1e-4 with a cosine schedule and 10 warm-up
steps, effective batch 64, max length 256, loss on the responses only; the adapters are merged after.
``FinetuneConfig`` holds that recipe as its defaults, every value overridable.

Why a small loop of our own rather than ``transformers.Trainer``: the model has per-layer widths (a
``slimgpt_<family>`` class), the checkpoint must resume bit for bit on the CPU, and every tensor we write
must be safetensors (the Trainer pickles optimizer state). The loop is short: fixed batches drawn
from a seeded per-epoch permutation, gradient accumulation with the loss normalised by the target-token
count of the whole batch (so micro-batching does not change the gradient), clipping, AdamW, and an lr
that is a pure function of the step.

Data: instruction records (Alpaca's instruction / input / output, from the Hub or a local ``.jsonl``)
become one example each, formatted with the Stanford Alpaca template of ``slimgpt.data``; with
``response_only`` the prompt tokens get label -100. Raw text (``builtin``, other named sources, ``.txt``,
``.jsonl`` with a ``text`` field, a directory) is tokenized as one stream and cut into ``max_length``
windows with the plain causal-LM loss.

Resuming: every ``checkpoint_every`` steps the adapter weights (peft's safetensors save), the AdamW
moments (safetensors) and its scalars (JSON), the RNG states (safetensors), the step and the log are
written atomically. The data position is the step: batches are a function of (seed, step). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

import slimgpt.data as data_sources
from slimgpt._util.files import write_checkpoint_marker
from slimgpt._util.validate import check_field_types
from slimgpt._util.versions import versions
from slimgpt.errors import ConfigError, DataError
from slimgpt.models.families import get_adapter
from slimgpt.saving import write_atomic_dir

logger = logging.getLogger(__name__)

FINETUNE_CONFIG_VERSION = 1
# Roles of a decoder layer's linear maps. gate/up are the FFN inputs (LLaMA: gate_proj, up_proj; a family
# with one FFN input, like OPT's fc1, maps both to it), down is the FFN output (down_proj, fc2).
LORA_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
LR_SCHEDULES = ("cosine", "linear", "constant")
IGNORE_INDEX = -100  # the label torch's cross-entropy skips
INSTRUCTION_FIELDS = ("instruction", "output")
# Options that may differ between a run and its resumption: they do not change what is computed.
RESUME_FREE_OPTIONS = ("checkpoint_every", "device")
LOG_FILE = "finetune_log.json"
PROVENANCE_FILE = "slimgpt_finetune.json"
TOKENIZE_BATCH = 256  # documents per tokenizer call: large enough for the fast tokenizer's threads


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides a fine-tuning run. Defaults are the paper's recipe (method spec section 9).

    data: alpaca, gpt4-alpaca (instruction records), builtin / c4 / wikitext2 / ptb (raw text), or a local
        ``.jsonl`` (instruction records, or ``text`` records) / ``.txt`` file or a directory of text files.
    lora_rank / lora_alpha / lora_dropout / lora_targets: the adapters; targets are roles (``LORA_ROLES``)
        mapped to each family's modules, or module-name suffixes (``fc1``, ``mlp.up_proj``) used as given.
    learning_rate / lr_schedule / warmup_steps: AdamW's peak lr, its decay and linear warm-up.
    batch_size: examples per optimizer step; micro_batch_size: examples per forward (batch_size must be a
        multiple); max_length: tokens per example; epochs: passes over the data (may be fractional);
        max_steps: if set, exactly this many optimizer steps instead (cycling through the data).
    weight_decay / max_grad_norm: AdamW's decoupled decay; gradient clipping (0 disables it).
    response_only: on instruction data, compute the loss on the response tokens only.
    seed: LoRA initialisation, dropout and data order. device: where training runs. bf16: autocast.
    checkpoint_every: optimizer steps between resumable checkpoints (when a checkpoint folder is given).
    """

    data: str = "alpaca"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_ROLES
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    batch_size: int = 64
    micro_batch_size: int = 4
    max_length: int = 256
    epochs: float = 1.0
    max_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    response_only: bool = True
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    checkpoint_every: int = 50
    version: int = FINETUNE_CONFIG_VERSION

    def __post_init__(self) -> None:
        # Lists (from JSON or a caller) become tuples so the config stays hashable and comparable.
        if not isinstance(self.lora_targets, list | tuple) or not all(isinstance(t, str) for t in self.lora_targets):
            raise ConfigError(f"--lora-targets {self.lora_targets!r} is not a list of names: pass roles or modules")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        check_field_types(self, {"max_steps": int})  # types, and finite numbers (slimgpt._util.validate)
        if not str(self.data).strip():
            raise ConfigError("--data is empty: pass alpaca, gpt4-alpaca, builtin or a local .jsonl/.txt path")
        for name in ("lora_rank", "lora_alpha", "batch_size", "micro_batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length} must be at least 2 (one input and one target token)")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}: pick sizes that divide")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout {self.lora_dropout} is outside [0, 1)")
        if not self.lora_targets or any(not str(t).strip() for t in self.lora_targets):
            raise ConfigError(f"--lora-targets {','.join(self.lora_targets)!r} is empty: name roles "
                              f"({','.join(LORA_ROLES)}) or module names")
        if not self.learning_rate > 0:
            raise ConfigError(f"--lr {self.learning_rate} must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule {self.lr_schedule!r} is not one of: {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} must be >= 0")
        if not self.epochs > 0:
            raise ConfigError(f"--epochs {self.epochs} must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps {self.max_steps} must be a positive integer")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay} must be >= 0")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm {self.max_grad_norm} must be >= 0 (0 disables clipping)")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
        if self.version != FINETUNE_CONFIG_VERSION:
            raise ConfigError(f"fine-tuning config version {self.version} is not supported "
                              f"(this slimgpt reads {FINETUNE_CONFIG_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown fine-tuning option(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        return cls.from_dict(json.loads(text))


# --- data -------------------------------------------------------------------------------------------


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
    values = {key: str(record.get(key) or "").strip() for key in ("instruction", "input", "output")}
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
    separator = data_sources.corpus.DOC_SEPARATOR
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
    resolved = data_sources._resolve(source)
    if isinstance(resolved, data_sources.HubSource):
        return _hub_records(source, resolved) if resolved.record_format == "alpaca" else None
    if isinstance(resolved, data_sources.LocalSource) and resolved.path.is_file() \
            and resolved.path.suffix.lower() == ".jsonl":
        return _jsonl_records(resolved.path)
    return None


def _hub_records(name: str, hub: data_sources.HubSource) -> list[dict[str, Any]]:
    # slimgpt.data owns the Hub access (offline checks, cache, one-line errors); reuse it, not a copy.
    dataset = data_sources._load_hub_split(name, hub, hub.calibration_split, hub.calibration_files)
    if hub.heldout_fraction > 0:
        dataset = dataset.select(data_sources._heldout_range(len(dataset), hub.heldout_fraction, "calibration"))
    data_sources._require_columns(name, dataset.column_names, INSTRUCTION_FIELDS)
    return [dict(record) for record in dataset]


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


# --- schedule and batches ---------------------------------------------------------------------------


def total_steps(num_examples: int, config: FinetuneConfig) -> int:
    """Optimizer steps of the run: ``max_steps``, else ceil(epochs * examples / batch_size)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(_total_examples(num_examples, config) / config.batch_size))


def _total_examples(num_examples: int, config: FinetuneConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps * config.batch_size
    return max(1, round(config.epochs * num_examples))


def learning_rate_at(step: int, steps: int, config: FinetuneConfig) -> float:
    """The lr of optimizer step ``step`` (0-based) of ``steps``: linear warm-up, then the schedule.

    Warm-up is peak * (step + 1) / warmup_steps, so the first step already learns (transformers' schedule
    gives it lr 0); the decay is transformers' cosine / linear over the steps after warm-up.
    """
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return peak
    progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchOrder:
    """Which examples make optimizer step ``step``: a function of (seed, step), so a resumed run needs
    only the step. Example g of the run (g = step * batch_size + j) is position g % n of epoch g // n's
    permutation; each epoch has its own seeded permutation."""

    def __init__(self, num_examples: int, total_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples, self.total_examples = num_examples, total_examples
        self.batch_size, self.seed = batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)).tolist()}
        return self._orders[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        stop = min(start + self.batch_size, self.total_examples)
        return [self._order(g // self.num_examples)[g % self.num_examples] for g in range(start, stop)]


# --- LoRA targets -----------------------------------------------------------------------------------


def lora_target_modules(model: nn.Module, targets: Sequence[str] = LORA_ROLES) -> list[str]:
    """Full module names of the linear maps ``targets`` names, in model order.

    Roles are looked up through the family's adapter, so q/k/v/o/gate/up/down mean q_proj ... down_proj
    on LLaMA and q_proj/k_proj/v_proj/out_proj/fc1/fc2 on OPT. Any other target is a module-name suffix.
    Maps pruned to zero width (a layer that lost every head) are skipped: there is nothing to adapt.
    """
    adapter = get_adapter(getattr(model, "config", None))
    names = {id(module): name for name, module in model.named_modules()}
    chosen: dict[str, None] = {}  # an ordered set
    roles = [target for target in targets if target in LORA_ROLES]
    for layer in adapter.decoder_layers(model):
        q, k, v = adapter.attn_inputs(layer)
        ffn_in = adapter.mlp_inputs(layer)
        by_role = {"q": q, "k": k, "v": v, "o": adapter.attn_output(layer), "gate": ffn_in[0],
                   "up": ffn_in[-1], "down": adapter.mlp_output(layer)}
        for role in roles:
            if by_role[role].weight.numel() > 0:
                chosen[names[id(by_role[role])]] = None
    for suffix in (target for target in targets if target not in LORA_ROLES):
        matches = [name for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and (name == suffix or name.endswith("." + suffix))]
        if not matches:
            raise ConfigError(f"--lora-targets {suffix!r} is neither a role ({','.join(LORA_ROLES)}) nor the "
                              "name of a linear module of this model")
        chosen.update(dict.fromkeys(name for name in matches if _linear_numel(model, name) > 0))
    if not chosen:
        raise ConfigError("--lora-targets selects no linear map with weights: name other roles or modules")
    return list(chosen)


def _linear_numel(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return module.weight.numel()


# --- the report -------------------------------------------------------------------------------------


@dataclass
class StepLog:
    """One optimizer step: mean loss over its target tokens, the lr used, the gradient norm before
    clipping, target and input tokens, and seconds since the run began (across resumptions)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    input_tokens: int
    seconds: float


@dataclass
class FinetuneReport:
    model: str
    config: dict[str, Any]
    data: dict[str, Any]
    lora_targets: list[str]
    trainable_params: int
    total_params: int
    steps: int
    total_steps: int
    finished: bool
    resumed_from_step: int
    seconds: float
    device: str
    versions: dict[str, str]
    log: list[StepLog] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(entry.tokens for entry in self.log)

    @property
    def first_loss(self) -> float | None:
        return self.log[0].loss if self.log else None

    @property
    def final_loss(self) -> float | None:
        return self.log[-1].loss if self.log else None

    def to_dict(self, with_log: bool = True) -> dict[str, Any]:
        values = asdict(self)
        values |= {"tokens": self.tokens, "first_loss": self.first_loss, "final_loss": self.final_loss}
        if not with_log:
            values.pop("log")
        return values

    def to_json(self, with_log: bool = True) -> str:
        return json.dumps(self.to_dict(with_log), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneReport:
        values = {k: v for k, v in values.items() if k not in ("tokens", "first_loss", "final_loss")}
        values["log"] = [StepLog(**entry) for entry in values.get("log", [])]
        return cls(**values)

    def summary_line(self) -> str:
        cfg = self.config
        loss = (f"loss {self.first_loss:.4f} -> {self.final_loss:.4f}"
                if self.first_loss is not None and self.final_loss is not None else "no step run")
        return (f"LoRA r={cfg['lora_rank']} alpha={cfg['lora_alpha']} dropout {cfg['lora_dropout']:g} on "
                f"{len(self.lora_targets)} linear maps ({','.join(cfg['lora_targets'])}), merged; "
                f"data {cfg['data']} ({self.data['kind']}, {self.data['examples']} examples"
                f"{', response-only loss' if self.data['kind'] == 'instruction' and cfg['response_only'] else ''}); "
                f"{self.steps} steps x {cfg['batch_size']} examples, {self.tokens:,} target tokens, "
                f"lr {cfg['learning_rate']:g} {cfg['lr_schedule']} with {cfg['warmup_steps']} warm-up steps, "
                f"max length {cfg['max_length']}; {loss}; {self.seconds:.0f} s on {self.device}")

    def to_markdown(self) -> str:
        lines = [f"**LoRA fine-tuning** of `{self.model}`: {self.summary_line()}", "",
                 "| step | loss | lr | grad norm | tokens | seconds |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        every = max(1, len(self.log) // 20)
        shown = [entry for i, entry in enumerate(self.log) if i % every == 0 or i == len(self.log) - 1]
        lines += [f"| {e.step} | {e.loss:.4f} | {e.lr:.2e} | {e.grad_norm:.3f} | {e.tokens} | {e.seconds:.1f} |"
                  for e in shown]
        return "\n".join(lines)


# --- checkpoints --------------------------------------------------------------------------------------


class _Checkpoint:
    """Resumable training state in one folder, replaced atomically as a whole on every save."""

    def __init__(self, directory: Path, device: torch.device) -> None:
        self.directory, self.device = directory, device

    def exists(self) -> bool:
        return (self.directory / "state.json").exists()

    def save(self, peft_model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        def fill(tmp: Path) -> None:
            peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
            optimizer_state = optimizer.state_dict()
            tensors = {f"state.{index}.{name}": value.detach().contiguous().cpu()
                       for index, values in optimizer_state["state"].items() for name, value in values.items()}
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            save_file(_rng_state(self.device), str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state | {"param_groups": optimizer_state["param_groups"]}))
            write_checkpoint_marker(tmp)  # only marked folders are ever deleted

        write_atomic_dir(self.directory, fill, overwrite=True)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.directory / "state.json").read_text())
        return state

    def restore(self, peft_model: Any, optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]]) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        adapter = load_peft_weights(str(self.directory / "adapter"), device="cpu")
        result = set_peft_model_state_dict(peft_model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise DataError(f"the checkpoint in {self.directory} holds adapters of another model: delete it to "
                            "start over")
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(self.directory / "optimizer.safetensors")).items():
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
        groups = [group | {"betas": tuple(group["betas"])} if "betas" in group else group for group in param_groups]
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        _set_rng_state(load_file(str(self.directory / "rng.safetensors")), self.device)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU's, and the training device's when it is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def _private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's global generators for the run (dropout and LoRA init draw from them) and give the
    caller's RNG state back afterwards: training leaves no trace on the caller's randomness."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _versions() -> dict[str, str]:
    return versions("torch", "transformers", "peft")


# --- training ----------------------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    *,
    training_data: TrainingData | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    model_name: str = "",
    progress: bool = True,
    stop_after_step: int | None = None,
    on_step: Callable[[StepLog], None] | None = None,
) -> FinetuneReport:
    """LoRA-tune ``model`` in place on ``config.data`` and merge the adapters into its weights.

    ``model`` keeps its class and its per-layer widths; on return it holds the merged weights, in eval
    mode, on ``config.device``, with its parameters' ``requires_grad`` as they were. If training stops
    with an error the adapters are removed unmerged, leaving the weights as they were.
    training_data: pre-tokenized examples (default: ``load_training_data(tokenizer, config)``).
    checkpoint_dir / resume: save every ``config.checkpoint_every`` steps; continue from the last save.
    stop_after_step: stop after that many steps without merging (tests use it to simulate a crash).
    on_step: called after every optimizer step with its log entry.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, config.lora_targets)
    dataset = training_data if training_data is not None else load_training_data(tokenizer, config)
    examples = dataset.examples
    steps = total_steps(len(examples), config)
    order = BatchOrder(len(examples), _total_examples(len(examples), config), config.batch_size, config.seed)
    fingerprint = dataset.fingerprint()
    device = torch.device(config.device)
    checkpoint = _Checkpoint(Path(checkpoint_dir), device) if checkpoint_dir is not None else None
    saved = checkpoint.state() if checkpoint is not None and resume and checkpoint.exists() else None
    if saved is not None:
        _check_resumable(saved, config, fingerprint, checkpoint)
    elif resume:
        logger.info("no checkpoint to resume from in %s: starting from step 0", checkpoint_dir)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    total_params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.to(device)

    with _private_rng(device, config.seed):
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        peft_model: Any = get_peft_model(model, lora)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        log: list[StepLog] = []
        start_step, seconds_before = 0, 0.0
        if saved is not None and checkpoint is not None:
            checkpoint.restore(peft_model, optimizer, saved["param_groups"])
            start_step, seconds_before = int(saved["step"]), float(saved["seconds"])
            log = [StepLog(**entry) for entry in saved["log"]]
            logger.info("resuming after step %d of %d from %s", start_step, steps, checkpoint.directory)
        report = FinetuneReport(
            model=model_name, config=config.to_dict(),
            data=dataset.description | {"kind": dataset.kind, "examples": len(examples), "dropped": dataset.dropped,
                                        "fingerprint": fingerprint},
            lora_targets=targets, trainable_params=sum(p.numel() for p in trainable),
            total_params=total_params, steps=start_step, total_steps=steps,
            finished=False, resumed_from_step=start_step, seconds=seconds_before, device=str(device),
            versions=_versions(), log=log,
        )
        logger.info("fine-tuning %d LoRA parameters (%d linear maps) on %d %s examples: %d steps of %d",
                    report.trainable_params, len(targets), len(examples), dataset.kind, steps, config.batch_size)
        last = steps if stop_after_step is None else min(steps, stop_after_step)
        try:
            peft_model.train()
            started = time.perf_counter()
            bar = tqdm(total=steps, initial=start_step, desc="finetune", unit="step", disable=not progress)
            for step in range(start_step, last):
                batch = [examples[i] for i in order.batch(step)]
                entry = _train_step(peft_model, optimizer, trainable, batch, step, steps, config, device, pad_id)
                entry.seconds = seconds_before + time.perf_counter() - started
                log.append(entry)
                report.steps, report.seconds = step + 1, entry.seconds
                bar.update(1)
                bar.set_postfix(loss=f"{entry.loss:.4f}", lr=f"{entry.lr:.2e}")
                logger.debug("step %d: loss %.4f lr %.3e grad norm %.3f", entry.step, entry.loss, entry.lr,
                             entry.grad_norm)
                if on_step is not None:
                    on_step(entry)
                if checkpoint is not None and (step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
                    checkpoint.save(peft_model, optimizer, {
                        "step": step + 1, "seconds": entry.seconds, "config": config.to_dict(),
                        "fingerprint": fingerprint, "log": [asdict(e) for e in log]})
            bar.close()
        except BaseException:
            peft_model.unload()
            _restore_flags(model, requires_grad, was_training)
            raise
        if last < steps:
            peft_model.unload()  # a simulated crash: leave the weights as they were
        else:
            peft_model.merge_and_unload()
            report.finished = True
    _restore_flags(model, requires_grad, False)
    return report


def _train_step(peft_model: Any, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
                batch: list[Example], step: int, steps: int, config: FinetuneConfig, device: torch.device,
                pad_id: int) -> StepLog:
    """One optimizer step over ``batch`` in micro-batches; the loss is the mean over the batch's targets."""
    targets = sum(example.targets for example in batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    loss_total = 0.0
    for start in range(0, len(batch), config.micro_batch_size):
        input_ids, mask, labels = (t.to(device) for t in collate(batch[start : start + config.micro_batch_size],
                                                                 pad_id))
        with autocast:
            logits = peft_model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits  # [b, t, V]
        # Sum over this micro-batch's targets / targets of the whole batch: the micro-batches add up to
        # the batch mean whatever their sizes.
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") / targets
        loss.backward()
        loss_total += float(loss.detach())
    if config.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in trainable if p.grad is not None])))
    lr = learning_rate_at(step, steps, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepLog(step=step + 1, loss=loss_total, lr=lr, grad_norm=grad_norm, tokens=targets,
                   input_tokens=sum(len(example.input_ids) for example in batch), seconds=0.0)


def _check_resumable(saved: dict[str, Any], config: FinetuneConfig, fingerprint: str,
                     checkpoint: _Checkpoint | None) -> None:
    where = checkpoint.directory if checkpoint is not None else "the checkpoint"
    before, now = saved["config"], config.to_dict()
    changed = sorted(key for key in set(before) | set(now)
                     if key not in RESUME_FREE_OPTIONS and before.get(key) != now.get(key))
    if changed:
        raise ConfigError(f"the checkpoint in {where} was made with other options ({', '.join(changed)}): "
                          "resume with the same options, or delete it to start over")
    if saved["fingerprint"] != fingerprint:
        raise DataError(f"the checkpoint in {where} was made on other data (the tokenized examples differ): "
                        "resume with the same --data and tokenizer, or delete it to start over")


def _restore_flags(model: nn.Module, requires_grad: dict[str, bool], training: bool) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    model.train(training)


# --- saving -------------------------------------------------------------------------------------------


def finetune_card(report: FinetuneReport) -> str:
    """The model-card section that records the fine-tuning (appended to the pruned model's card)."""
    return (f"\n## Recovery fine-tuning (slimgpt finetune)\n\n{report.summary_line()}.\n\n"
            f"Options and provenance: `{PROVENANCE_FILE}`; loss, lr and tokens per step: `{LOG_FILE}`.\n")


def save_finetuned(model: Any, tokenizer: Any, report: FinetuneReport, output: str | Path, *,
                   source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the merged model like ``save_pruned`` does (safetensors, config, tokenizer), atomically.

    From ``source`` (the pruned folder) the pruning report is copied and its model card extended with a
    fine-tuning section; ``slimgpt_finetune.json`` holds the options and provenance, ``finetune_log.json``
    the per-step log.
    """
    source_dir = Path(source) if source is not None and Path(source).is_dir() else None

    def fill(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        card = f"# {Path(report.model).name or 'model'} fine-tuned with slimgpt\n"
        if source_dir is not None:
            if (source_dir / "slimgpt_report.json").exists():
                shutil.copyfile(source_dir / "slimgpt_report.json", directory / "slimgpt_report.json")
            if (source_dir / "README.md").exists():
                card = (source_dir / "README.md").read_text()
        (directory / "README.md").write_text(card.rstrip("\n") + "\n" + finetune_card(report))
        provenance = report.to_dict(with_log=False) | {
            "source": str(source_dir.resolve()) if source_dir is not None else report.model}
        (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        (directory / LOG_FILE).write_text(json.dumps([asdict(entry) for entry in report.log], indent=1) + "\n")

    return write_atomic_dir(output, fill, overwrite)
