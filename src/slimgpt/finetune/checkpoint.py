"""Resumable training state: adapters, AdamW moments, RNG states, the step and the log, in one folder.

Every ``checkpoint_every`` steps the adapter weights (peft's safetensors save), the AdamW moments
(safetensors) and its scalars (JSON), the RNG states (safetensors), the step and the log are written
atomically. The data position is the step: batches are a function of (seed, step). No pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimgpt._util.files import write_atomic_dir, write_checkpoint_marker
from slimgpt.errors import ConfigError, DataError
from slimgpt.finetune.config import RESUME_FREE_OPTIONS, FinetuneConfig


class TrainingCheckpoint:
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

    def check_resumable(self, saved: dict[str, Any], config: FinetuneConfig, fingerprint: str) -> None:
        """Raise unless ``saved`` was made with the same options (``RESUME_FREE_OPTIONS`` aside) and data."""
        before, now = saved["config"], config.to_dict()
        changed = sorted(key for key in set(before) | set(now)
                         if key not in RESUME_FREE_OPTIONS and before.get(key) != now.get(key))
        if changed:
            raise ConfigError(f"the checkpoint in {self.directory} was made with other options "
                              f"({', '.join(changed)}): resume with the same options, or delete it to start over")
        if saved["fingerprint"] != fingerprint:
            raise DataError(f"the checkpoint in {self.directory} was made on other data (the tokenized examples "
                            "differ): resume with the same --data and tokenizer, or delete it to start over")

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
def private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's global generators for the run (dropout and LoRA init draw from them) and give the
    caller's RNG state back afterwards: training leaves no trace on the caller's randomness."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
