"""What a fine-tuning run did: one ``StepLog`` per optimizer step and the ``FinetuneReport``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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

