"""slimgpt.config: PruneConfig is frozen, validated on construction, and round-trips to JSON."""

from __future__ import annotations

import dataclasses

import pytest

from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError


def test_round_trip_and_defaults() -> None:
    config = PruneConfig(ratio=0.5, schedule="uniform", method="flap")
    assert PruneConfig.from_json(config.to_json()) == config
    assert PruneConfig().ratio == 0.2 and PruneConfig().schedule == "log-increase"


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PruneConfig().ratio = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(("values", "message"), [
    ({"ratio": 1.0}, "--ratio"),
    ({"ratio": -0.1}, "--ratio"),
    ({"method": "nope"}, "--method 'nope' is not one of"),
    ({"schedule": "cubic"}, "--schedule"),
    ({"nsamples": 0}, "--nsamples must be a positive integer"),
    ({"percdamp": -1.0}, "--percdamp"),
    ({"version": 99}, "config version 99"),
])
def test_bad_values_name_the_flag(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**values)  # type: ignore[arg-type]


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown pruning option"):
        PruneConfig.from_dict({"ratio": 0.2, "sparsity": 0.5})
