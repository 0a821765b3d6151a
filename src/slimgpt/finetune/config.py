"""``FinetuneConfig``: every option of a fine-tuning run, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from slimgpt._util.jsonconfig import JsonConfig
from slimgpt._util.validate import check_field_types
from slimgpt.errors import ConfigError

FINETUNE_CONFIG_VERSION = 1
# Roles of a decoder layer's linear maps. gate/up are the FFN inputs (LLaMA: gate_proj, up_proj; a family
# with one FFN input, like OPT's fc1, maps both to it), down is the FFN output (down_proj, fc2).
LORA_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
LR_SCHEDULES = ("cosine", "linear", "constant")
# Options that may differ between a run and its resumption: they do not change what is computed.
RESUME_FREE_OPTIONS = ("checkpoint_every", "device")


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    """Everything that decides a fine-tuning run. Defaults are the SlimGPT paper's recovery recipe.

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

    options_label: ClassVar[str] = "fine-tuning option"

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
        self._check_sizes()
        self._check_optimizer()
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
        if self.version != FINETUNE_CONFIG_VERSION:
            raise ConfigError(f"fine-tuning config version {self.version} is not supported "
                              f"(this slimgpt reads {FINETUNE_CONFIG_VERSION})")

    def _check_sizes(self) -> None:
        """The adapters, batches and lengths."""
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

    def _check_optimizer(self) -> None:
        """The learning rate, its schedule, the length of the run and the regularisation."""
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

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["lora_targets"] = list(self.lora_targets)
        return values
