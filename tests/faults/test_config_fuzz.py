"""Fuzzing PruneConfig and FinetuneConfig: every input is accepted (and usable) or raises ConfigError."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_model
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError, SlimGPTError
from slimgpt.finetune import FinetuneConfig
from slimgpt.prune import plan

ANY = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=6), st.sampled_from(["cpu", "c4", "slimgpt", "uniform", "kv-group", "fast", "1"]))
PRUNE_FIELDS = ["method", "ratio", "schedule", "first_ratio", "first_fraction", "calib", "nsamples", "seqlen",
                "seed", "percdamp", "head_score", "compensate", "group_schedule", "group_start", "group_floor",
                "group_fraction", "gqa_policy", "solver", "round_to", "device", "offload", "batch_size"]
FINETUNE_FIELDS = ["data", "lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "lr_schedule",
                   "warmup_steps", "batch_size", "micro_batch_size", "max_length", "epochs", "max_steps",
                   "weight_decay", "max_grad_norm", "response_only", "seed", "device", "bf16", "checkpoint_every"]
MODEL = make_model("llama")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accepted_values_are_typed(config: Any) -> None:
    for name, value in config.to_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), name


@FUZZ
@given(st.dictionaries(st.sampled_from(PRUNE_FIELDS), ANY, max_size=4))
def test_prune_config_accepts_or_refuses(values: dict[str, Any]) -> None:
    try:
        config = PruneConfig(**values)
    except ConfigError:
        return
    _accepted_values_are_typed(config)
    assert PruneConfig.from_json(config.to_json()) == config
    if config.method in ("slimgpt", "magnitude", "wanda-sp"):
        with contextlib.suppress(SlimGPTError):  # accepted options run (a schedule), or a one-line refusal
            plan(MODEL, config)


@FUZZ
@given(st.dictionaries(st.sampled_from(FINETUNE_FIELDS), ANY, max_size=4))
def test_finetune_config_accepts_or_refuses(values: dict[str, Any]) -> None:
    try:
        config = FinetuneConfig(**values)
    except ConfigError:
        return
    _accepted_values_are_typed(config)
    assert FinetuneConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values", [{"compensate": "no"}, {"nsamples": 2.5}, {"seed": "x"}, {"device": 3},
                                    {"percdamp": float("nan")}, {"ratio": float("inf")}, {"calib": " "}])
def test_prune_config_refuses_wrong_types(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        PruneConfig(**values)


@pytest.mark.parametrize("values", [{"weight_decay": float("inf")}, {"learning_rate": float("nan")},
                                    {"lora_rank": 2.5}, {"bf16": "yes"}, {"lora_targets": "q_proj"}])
def test_finetune_config_refuses_wrong_types(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FinetuneConfig(**values)
