"""The fine-tuning loop: LoRA adapters on a pruned model, AdamW, resumption, and the merge.

Why a small loop of our own rather than ``transformers.Trainer``: the model has per-layer widths (a
``slimgpt_<family>`` class), the checkpoint must resume bit for bit on the CPU, and every tensor we write
must be safetensors (the Trainer pickles optimizer state). The loop is short: fixed batches drawn
from a seeded per-epoch permutation, gradient accumulation with the loss normalised by the target-token
count of the whole batch (so micro-batching does not change the gradient), clipping, AdamW, and an lr
that is a pure function of the step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimgpt._util.versions import versions
from slimgpt.finetune.checkpoint import TrainingCheckpoint, private_rng
from slimgpt.finetune.config import FinetuneConfig
from slimgpt.finetune.data import IGNORE_INDEX, Example, TrainingData, collate, load_training_data
from slimgpt.finetune.report import FinetuneReport, StepLog
from slimgpt.finetune.schedule import (
    BatchOrder,
    learning_rate_at,
    lora_target_modules,
    total_examples,
    total_steps,
)

logger = logging.getLogger(__name__)


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
    targets = lora_target_modules(model, config.lora_targets)
    dataset = training_data if training_data is not None else load_training_data(tokenizer, config)
    fingerprint = dataset.fingerprint()
    device = torch.device(config.device)
    checkpoint = TrainingCheckpoint(Path(checkpoint_dir), device) if checkpoint_dir is not None else None
    saved = _saved_state(checkpoint, resume, config, fingerprint)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    total_params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.to(device)

    with private_rng(device, config.seed):
        peft_model = _with_adapters(model, config, targets)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        loop = _Loop(peft_model, optimizer, trainable, dataset.examples, config, device, pad_id, checkpoint,
                     fingerprint)
        report = loop.new_report(model_name, dataset, targets, total_params)
        if saved is not None:
            loop.resume(report, saved)
        logger.info("fine-tuning %d LoRA parameters (%d linear maps) on %d %s examples: %d steps of %d",
                    report.trainable_params, len(targets), len(dataset.examples), dataset.kind, loop.steps,
                    config.batch_size)
        last = loop.steps if stop_after_step is None else min(loop.steps, stop_after_step)
        try:
            loop.run(report, last, progress, on_step)
        except BaseException:
            peft_model.unload()
            _restore_flags(model, requires_grad, was_training)
            raise
        if last < loop.steps:
            peft_model.unload()  # a simulated crash: leave the weights as they were
        else:
            peft_model.merge_and_unload()
            report.finished = True
    _restore_flags(model, requires_grad, False)
    return report


def _saved_state(checkpoint: TrainingCheckpoint | None, resume: bool, config: FinetuneConfig,
                 fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint's state when resuming from one, checked to belong to this run; else None."""
    saved = checkpoint.state() if checkpoint is not None and resume and checkpoint.exists() else None
    if saved is not None and checkpoint is not None:
        checkpoint.check_resumable(saved, config, fingerprint)
    elif resume:
        where = checkpoint.directory if checkpoint is not None else None
        logger.info("no checkpoint to resume from in %s: starting from step 0", where)
    return saved


def _with_adapters(model: nn.Module, config: FinetuneConfig, targets: list[str]) -> Any:
    """``model`` wrapped by peft with fresh LoRA adapters on ``targets`` (drawn from torch's generator)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class _Loop:
    """What every optimizer step of one run needs: the model with adapters, AdamW, the data and its order."""

    def __init__(self, peft_model: Any, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
                 examples: list[Example], config: FinetuneConfig, device: torch.device, pad_id: int,
                 checkpoint: TrainingCheckpoint | None, fingerprint: str) -> None:
        self.peft_model, self.optimizer, self.trainable = peft_model, optimizer, trainable
        self.examples, self.config, self.device, self.pad_id = examples, config, device, pad_id
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        self.steps = total_steps(len(examples), config)
        self.order = BatchOrder(len(examples), total_examples(len(examples), config), config.batch_size,
                                config.seed)

    def new_report(self, model_name: str, dataset: TrainingData, targets: list[str],
                   total_params: int) -> FinetuneReport:
        """The report of a run that has not taken a step yet."""
        data = dataset.description | {"kind": dataset.kind, "examples": len(dataset.examples),
                                      "dropped": dataset.dropped, "fingerprint": self.fingerprint}
        return FinetuneReport(
            model=model_name, config=self.config.to_dict(), data=data, lora_targets=targets,
            trainable_params=sum(p.numel() for p in self.trainable), total_params=total_params, steps=0,
            total_steps=self.steps, finished=False, resumed_from_step=0, seconds=0.0, device=str(self.device),
            versions=versions("torch", "transformers", "peft"), log=[],
        )

    def resume(self, report: FinetuneReport, saved: dict[str, Any]) -> None:
        """Load the adapters, AdamW and RNG states of the checkpoint; ``report`` continues its log."""
        assert self.checkpoint is not None
        self.checkpoint.restore(self.peft_model, self.optimizer, saved["param_groups"])
        report.steps = report.resumed_from_step = int(saved["step"])
        report.seconds = float(saved["seconds"])
        report.log = [StepLog(**entry) for entry in saved["log"]]
        logger.info("resuming after step %d of %d from %s", report.steps, self.steps, self.checkpoint.directory)

    def run(self, report: FinetuneReport, last: int, progress: bool,
            on_step: Callable[[StepLog], None] | None) -> None:
        """Steps ``report.steps`` up to ``last``, logged into ``report``, checkpointed every ``checkpoint_every``."""
        self.peft_model.train()
        first, seconds_before = report.steps, report.seconds
        started = time.perf_counter()
        bar = tqdm(total=self.steps, initial=first, desc="finetune", unit="step", disable=not progress)
        for step in range(first, last):
            entry = self.step(step)
            entry.seconds = seconds_before + time.perf_counter() - started
            report.log.append(entry)
            report.steps, report.seconds = step + 1, entry.seconds
            bar.update(1)
            bar.set_postfix(loss=f"{entry.loss:.4f}", lr=f"{entry.lr:.2e}")
            logger.debug("step %d: loss %.4f lr %.3e grad norm %.3f", entry.step, entry.loss, entry.lr,
                         entry.grad_norm)
            if on_step is not None:
                on_step(entry)
            if self.checkpoint is not None and (step + 1) % self.config.checkpoint_every == 0 \
                    and step + 1 < self.steps:
                self.checkpoint.save(self.peft_model, self.optimizer, {
                    "step": step + 1, "seconds": entry.seconds, "config": self.config.to_dict(),
                    "fingerprint": self.fingerprint, "log": [asdict(e) for e in report.log]})
        bar.close()

    def step(self, step: int) -> StepLog:
        """One optimizer step over its batch in micro-batches; the loss is the mean over the batch's targets."""
        config, device = self.config, self.device
        batch = [self.examples[i] for i in self.order.batch(step)]
        targets = sum(example.targets for example in batch)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
        loss_total = 0.0
        for start in range(0, len(batch), config.micro_batch_size):
            micro = collate(batch[start : start + config.micro_batch_size], self.pad_id)
            input_ids, mask, labels = (t.to(device) for t in micro)
            with autocast:
                logits = self.peft_model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits  # [b, t, V]
            # Sum over this micro-batch's targets / targets of the whole batch: the micro-batches add up to
            # the batch mean whatever their sizes.
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / targets
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = _clip_gradients(self.trainable, config.max_grad_norm)
        lr = learning_rate_at(step, self.steps, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepLog(step=step + 1, loss=loss_total, lr=lr, grad_norm=grad_norm, tokens=targets,
                       input_tokens=sum(len(example.input_ids) for example in batch), seconds=0.0)


def _clip_gradients(trainable: list[nn.Parameter], max_grad_norm: float) -> float:
    """The gradient norm before clipping; clipped to ``max_grad_norm`` unless it is 0."""
    if max_grad_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in trainable if p.grad is not None])))


def _restore_flags(model: nn.Module, requires_grad: dict[str, bool], training: bool) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    model.train(training)
