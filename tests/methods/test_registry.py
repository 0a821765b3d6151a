"""The method plug-in interface: the registry, the declared texts, and a method handed to prune_model."""

from __future__ import annotations

import pytest
import torch

from conftest import calibration, make_model
from slimgpt import PruneConfig, prune_model
from slimgpt.config import METHODS as CONFIG_METHODS
from slimgpt.methods import METHODS, Decision, LayerMethod, ModelMethod, PruneJob, get_method
from slimgpt.methods.base import Method
from slimgpt.saving import model_card


def test_the_registry_and_the_config_name_the_same_methods() -> None:
    assert sorted(METHODS) == sorted(CONFIG_METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_its_texts_and_kind(name: str) -> None:
    cls = METHODS[name]
    assert cls.name == name
    assert cls.summary.strip() and cls.help.strip() and "\n" not in cls.help
    assert issubclass(cls, (LayerMethod, ModelMethod))
    method = get_method(PruneConfig(method=name))
    assert isinstance(method, cls)
    assert isinstance(method.card_options(PruneConfig(method=name).to_dict()), str)


class KeepFirst(LayerMethod):
    """A minimal method: drops the highest-index units, no data, no compensation (defaults elsewhere)."""

    name = "keep-first"
    summary = "Test method: the last heads and channels removed."
    help = "test"
    needs_data = False
    needs_layer_inputs = False

    def _drop_last(self, job: PruneJob, count: int) -> Decision:
        removed = list(range(job.units.shape[0] - count, job.units.shape[0]))
        weight = job.weight.clone()
        weight[:, job.units[removed].flatten()] = 0
        return Decision(removed, weight)

    def prune_attention(self, job: PruneJob) -> Decision:
        return self._drop_last(job, job.rounds)

    def prune_ffn(self, job: PruneJob) -> Decision:
        return self._drop_last(job, job.rounds)


def test_prune_model_takes_a_method_object_with_default_hooks() -> None:
    model = make_model("llama")
    config = PruneConfig(ratio=0.3, nsamples=4, seqlen=16)
    report = prune_model(model, config, calibration(), method=KeepFirst(config), progress=False)
    assert report.method == "keep-first"
    assert abs(report.realised_ratio - 0.3) < 0.1  # the default plan (SlimGPT's schedule) solved for the target
    for row in report.layers:  # the highest-index heads and channels went
        assert row.kept_heads == list(range(row.heads_kept))
        assert row.kept_channels == list(range(row.ffn_kept))
    assert "Test method: the last heads and channels removed." in model_card(report)
    ids = torch.arange(16).view(1, -1)
    assert torch.isfinite(model(ids).logits).all()


def test_the_base_method_has_a_default_for_every_hook() -> None:
    method = Method(PruneConfig())
    assert method.cannot_stream() == ""
    assert "GQA policy" in method.card_options(PruneConfig().to_dict())
    layer_method = LayerMethod(PruneConfig())
    assert layer_method.prepare_layer(0, torch.nn.Linear(1, 1), None) is None  # type: ignore[arg-type]
