"""The length of a run, its learning rate per step, which examples each step reads, and the LoRA targets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from slimgpt.errors import ConfigError
from slimgpt.finetune.config import LORA_ROLES, FinetuneConfig
from slimgpt.models.families import get_adapter


def total_steps(num_examples: int, config: FinetuneConfig) -> int:
    """Optimizer steps of the run: ``max_steps``, else ceil(epochs * examples / batch_size)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(total_examples(num_examples, config) / config.batch_size))


def total_examples(num_examples: int, config: FinetuneConfig) -> int:
    """Examples the run reads, counting each repeat: ``max_steps`` batches, else ``epochs`` passes."""
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
