"""The pruning configuration: a frozen, validated, versioned dataclass that round-trips to JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimgpt._util.jsonconfig import JsonConfig
from slimgpt._util.validate import check_field_types
from slimgpt.errors import ConfigError
from slimgpt.solver.schedule import ALL_SCHEDULES, AUTO
from slimgpt.solver.structured import GROUP_SCHEDULES

CONFIG_VERSION = 1
METHODS = ("slimgpt", "magnitude", "wanda-sp", "flap", "llm-pruner", "slicegpt", "fasp", "prunenet", "modegpt",
           "dynamic-slicing", "dotresize", "disp-llm")
HEAD_SCORES = ("gcd", "gcd-diag", "diag")
GQA_POLICIES = ("kv-group", "query-heads")
SOLVERS = ("fast", "reference")


@dataclass(frozen=True)
class PruneConfig(JsonConfig):
    """Everything that decides a pruning run. Defaults are the paper's (docs/paper.md section 9).

    ratio: fraction of decoder-layer parameters to remove (embeddings and lm_head excluded).
    schedule / first_ratio / first_fraction: the per-layer ratio schedule ("auto": SlimGPT's measured
        allocation, slimgpt.methods.auto_schedule); r_0 = first_ratio, or
        first_fraction * r_last when first_ratio is None (the authors' 20% recipe is 0.0625 / 0.25).
    head_score: "gcd" (exact grouped-Cholesky group cost), "gcd-diag" (authors' score), "diag" (-GCD).
    compensate: OBS-update the surviving columns (False is the "no compensation" ablation).
    group_schedule / group_start / group_floor / group_fraction: FFN Dynamic Group Size; "fixed" is -DGS.
    gqa_policy: "kv-group" removes whole KV groups; "query-heads" removes query heads evenly per group.
    solver: "fast" (Schur downdates) or "reference" (re-invert every round, the authors' way).
    round_to: keep every layer's FFN width a multiple of this.
    method: a registered method (slimgpt.methods, one file each): "slimgpt"; the baselines "magnitude",
        "wanda-sp", "flap", "llm-pruner"; "slicegpt", which narrows the hidden width instead of removing
        heads / channels; the peers "fasp" (Wanda-style scores with a least-squares restoration),
        "prunenet" (a calibration-free policy, uniform FFN width), "modegpt" (keeps every head and
        shrinks their dims), "dynamic-slicing" (SliceGPT with a width per layer) and "disp-llm" (learned
        per-block residual index sets).
    taylor_samples / taylor_seqlen: LLM-Pruner's gradient pass uses the first ``taylor_samples``
        calibration windows cut to ``taylor_seqlen`` tokens (the authors: 10 samples of 64 tokens).
    spread: dynamic-slicing only: the share of the mean slice that follows layer redundancy, in [0, 1]
        (None: the method's default, 0.25; 0 is SliceGPT's constant width).
    eps: modegpt only: the smoothing eps of its per-layer budget softmax(-block importance / eps), > 0
        (None: the method's default, 0.15; smaller concentrates the pruning on the least important layers).
    device: where the layer being pruned runs; offload: keep calibration activations on the CPU.
    """

    options_label: ClassVar[str] = "pruning option"

    method: str = "slimgpt"
    ratio: float = 0.2
    schedule: str = "log-increase"
    first_ratio: float | None = None
    first_fraction: float = 0.25
    calib: str = "c4"
    nsamples: int = 256
    seqlen: int = 2048
    seed: int = 0
    percdamp: float = 0.01
    head_score: str = "gcd"
    compensate: bool = True
    group_schedule: str = "halving"
    group_start: int = 1024
    group_floor: int = 8
    group_fraction: float = 0.5
    gqa_policy: str = "kv-group"
    solver: str = "fast"
    round_to: int = 1
    device: str = "cpu"
    offload: bool = True
    batch_size: int = 0  # calibration windows a pass; 0: chosen from the memory budget (layerwise.memory)
    taylor_samples: int = 10
    taylor_seqlen: int = 64
    spread: float | None = None
    eps: float | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_field_types(self, {"first_ratio": float, "spread": float, "eps": float})
        if not self.calib.strip():
            raise ConfigError("--calib is empty: pass c4, wikitext2, ptb, alpaca, gpt4-alpaca, builtin or a local path")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r} is not a torch device: use cpu, cuda or cuda:N") from None

        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(options)}")

        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"--ratio {self.ratio} is outside [0, 1): give the fraction of parameters to remove")
        if self.first_ratio is not None and not 0.0 <= self.first_ratio < 1.0:
            raise ConfigError(f"--first-ratio {self.first_ratio} is outside [0, 1)")
        choice("method", METHODS)
        choice("schedule", ALL_SCHEDULES)
        if self.schedule == AUTO and self.method != "slimgpt":
            raise ConfigError(f"--schedule auto is SlimGPT's allocation; --method {self.method} has its own or a ratio "
                              "schedule: use --method slimgpt")
        choice("head_score", HEAD_SCORES)
        choice("group_schedule", GROUP_SCHEDULES)
        choice("gqa_policy", GQA_POLICIES)
        choice("solver", SOLVERS)
        if int(self.batch_size) < 0:
            raise ConfigError(f"--batch-size must be a positive integer or 0 (automatic), got {self.batch_size}")
        for name in ("nsamples", "seqlen", "group_start", "group_floor", "round_to",
                     "taylor_samples", "taylor_seqlen"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 < self.first_fraction <= 1.0:
            raise ConfigError(f"--first-fraction {self.first_fraction} must be in (0, 1]")
        if not 0.0 < self.group_fraction <= 1.0:
            raise ConfigError(f"--group-fraction {self.group_fraction} must be in (0, 1]")
        self._check_method_options()
        if self.percdamp < 0:
            raise ConfigError(f"--percdamp {self.percdamp} must be >= 0")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is not supported (this slimgpt reads {CONFIG_VERSION})")

    def _check_method_options(self) -> None:
        """--spread and --eps belong to one method each; a value another method would ignore is refused."""
        if self.spread is not None:
            if self.method != "dynamic-slicing":
                raise ConfigError(f"--spread is dynamic-slicing's option; --method {self.method} has none: drop it")
            if not 0.0 <= self.spread <= 1.0:
                raise ConfigError(f"--spread {self.spread} is outside [0, 1]: give the redundancy-driven share of "
                                  "the mean slice")
        if self.eps is not None:
            if self.method != "modegpt":
                raise ConfigError(f"--eps is modegpt's option; --method {self.method} has none: drop it")
            if not self.eps > 0.0:
                raise ConfigError(f"--eps {self.eps} must be > 0 (the smoothing of modegpt's per-layer budget)")

