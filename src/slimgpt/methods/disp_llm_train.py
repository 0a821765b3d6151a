"""DISP-LLM's training loop (slimgpt.methods.disp_llm): only the hypernetwork learns; the LLM is frozen.

Step s: the calibration windows of step s (a seeded permutation per epoch), gates drawn with noise seeded by
(seed, s), loss = CE(LM(x; z)) + lambda |log(P(z) / target)|, one AdamW step. Everything a step depends on is
a function of (seed, s) and the saved state, so a run resumed from its checkpoint gives bit for bit what an
uninterrupted one gives.

The checkpoint folder holds ``train-<step>.safetensors`` (the hypernetwork, AdamW's moments) and
``train.json`` (the step, the sha256 of that file, the run's fingerprint, the loss log so far), each written
atomically, the JSON last: a crash between the two leaves the previous state whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from slimgpt._util.files import save_tensors_atomic, sha256_file, write_checkpoint_marker, write_text_atomic
from slimgpt.errors import ConfigError
from slimgpt.methods.disp_llm_parts import BlockCost, HyperNetwork, MaskHooks, gumbel_gates, model_params
from slimgpt.models.adapters import ModelAdapter

logger = logging.getLogger(__name__)

STATE = "train.json"


@dataclass(frozen=True)
class TrainSettings:
    """What decides the training (the paper's values as defaults; ``steps`` from the calibration size)."""

    steps: int
    batch_size: int
    seed: int
    lr: float = 1e-3
    penalty: float = 16.0  # lambda
    temperature: float = 0.4
    offset: float = 3.0
    save_every: int = 50


@dataclass
class TrainResult:
    hypernetwork: HyperNetwork
    log: list[dict[str, float]]
    finished: bool


def _batch(calibration: torch.Tensor, step: int, settings: TrainSettings) -> torch.Tensor:
    """The windows of ``step``: consecutive slices of a permutation seeded by (seed, epoch)."""
    n = calibration.shape[0]
    per_epoch = max(n // settings.batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch))
    return calibration[order[position * settings.batch_size: (position + 1) * settings.batch_size]]


def _noise(settings: TrainSettings, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((settings.seed * 1_000_003 + step + 1) % (2**63))


class TrainCheckpoint:
    """The training state on disk (see the module docstring)."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def save(self, step: int, hypernetwork: HyperNetwork, optimizer: torch.optim.Optimizer,
             log: list[dict[str, float]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint_marker(self.directory)
        tensors = {f"hn.{k}": v for k, v in hypernetwork.state_dict().items()}
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"opt.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
        name = f"train-{step}.safetensors"
        save_tensors_atomic(tensors, self.directory / name)
        state = {"step": step, "tensors": name, "sha256": sha256_file(self.directory / name),
                 "fingerprint": self.fingerprint, "log": log}
        write_text_atomic(json.dumps(state) + "\n", self.directory / STATE)
        for old in self.directory.glob("train-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, hypernetwork: HyperNetwork, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, float]]]:
        """Restore the saved state into ``hypernetwork`` / ``optimizer``; returns (step, log). Refuses a
        checkpoint of another run or a damaged one."""
        state = json.loads((self.directory / STATE).read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"the checkpoint in {self.directory} is of another run (model, calibration data or "
                              "options differ): delete it to start over, or resume with the same options")
        path = self.directory / state["tensors"]
        if not path.exists() or sha256_file(path) != state["sha256"]:
            raise ConfigError(f"the checkpoint in {self.directory} is damaged ({path.name} is missing or changed): "
                              "delete it to start over")
        tensors = load_file(str(path))
        hypernetwork.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("hn.")})
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
        return int(state["step"]), list(state["log"])


def train_hypernetwork(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, costs: list[BlockCost],
                       target: int, settings: TrainSettings, checkpoint: TrainCheckpoint | None, resume: bool,
                       progress: bool = True, stop_after_step: int | None = None) -> TrainResult:
    """Train the hypernetwork for ``settings.steps`` steps (or until ``stop_after_step``, to test resuming)."""
    sizes = [size for cost in costs for size in cost.sizes]
    hypernetwork = HyperNetwork(sizes, torch.Generator().manual_seed(settings.seed))
    optimizer = torch.optim.AdamW(hypernetwork.parameters(), lr=settings.lr)
    start, log = 0, list[dict[str, float]]()
    if checkpoint is not None and resume and (checkpoint.directory / STATE).exists():
        start, log = checkpoint.load(hypernetwork, optimizer)
        logger.info("disp-llm: resuming the hypernetwork's training at step %d from %s", start, checkpoint.directory)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = MaskHooks(model, adapter)
    device = next(model.parameters()).device
    bar = tqdm(total=settings.steps, initial=start, desc="disp-llm hypernetwork", disable=not progress)
    step = start
    try:
        with torch.enable_grad():
            while step < settings.steps and (stop_after_step is None or step < stop_after_step):
                log.append(_step(model, hypernetwork, optimizer, hooks, calibration, costs, target, settings, step,
                                 device))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", kept=f"{log[-1]['kept_fraction']:.3f}")
                if checkpoint is not None and (step % settings.save_every == 0 or step == settings.steps):
                    checkpoint.save(step, hypernetwork, optimizer, log)
    finally:
        bar.close()
        hooks.remove()
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    return TrainResult(hypernetwork, log, step >= settings.steps)


def _step(model: nn.Module, hypernetwork: HyperNetwork, optimizer: torch.optim.Optimizer, hooks: MaskHooks,
          calibration: torch.Tensor, costs: list[BlockCost], target: int, settings: TrainSettings, step: int,
          device: torch.device) -> dict[str, float]:
    """One AdamW step of the hypernetwork; returns the loss log's entry."""
    gates = gumbel_gates(hypernetwork(), _noise(settings, step), settings.temperature, settings.offset)
    hooks.masks = gates
    ids = _batch(calibration, step, settings).to(device)
    ce = model(input_ids=ids, labels=ids).loss.float()
    params = model_params(costs, gates)
    penalty = settings.penalty * torch.log(params / target).abs()
    loss = ce + penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hooks.masks = []
    dense = sum(c.params(c.sizes) for c in costs)
    kept = float(params.detach())
    return {"step": step + 1, "loss": float(loss.detach()), "ce": float(ce.detach()),
            "penalty": float(penalty.detach()), "kept_params": kept, "kept_fraction": kept / dense}


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)
