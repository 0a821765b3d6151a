"""The calibration batch size: chosen from the memory budget, overridable, and without effect on the result."""

from __future__ import annotations

import logging

import pytest
import torch

import slimgpt.layerwise.capture as capture
import slimgpt.layerwise.memory as memory
from conftest import calibration, make_model
from slimgpt import PruneConfig, prune_model
from slimgpt.errors import ConfigError
from slimgpt.models.families import get_adapter


def _prune(family: str, method: str = "slimgpt", **overrides: object) -> tuple[torch.nn.Module, object]:
    model = make_model(family)
    values: dict[str, object] = dict(method=method, ratio=0.4, nsamples=8, seqlen=32)
    values.update(overrides)
    report = prune_model(model, PruneConfig(**values), calibration(), progress=False)  # type: ignore[arg-type]
    return model, report


def _assert_same_pruning(a: tuple[torch.nn.Module, object], b: tuple[torch.nn.Module, object]) -> None:
    (model_a, report_a), (model_b, report_b) = a, b
    for row_a, row_b in zip(report_a.layers, report_b.layers, strict=True):  # type: ignore[attr-defined]
        assert (row_a.kept_heads, row_a.kept_channels) == (row_b.kept_heads, row_b.kept_channels)
    state_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        scale = float(value.abs().max()) or 1.0
        assert float((value - state_b[key]).abs().max()) <= 1e-3 * scale, key  # OBS amplifies rounding


@pytest.mark.parametrize(("family", "method"), [("llama-gqa", "slimgpt"), ("llama", "flap")])
def test_result_does_not_depend_on_the_batch_size(family: str, method: str) -> None:
    one = _prune(family, method, batch_size=1)
    assert any(r.heads_kept < r.heads_total or r.ffn_kept < r.ffn_total for r in one[1].layers)  # type: ignore[attr-defined]
    _assert_same_pruning(one, _prune(family, method, batch_size=3))  # 3 leaves a short last batch
    _assert_same_pruning(one, _prune(family, method))  # automatic


def test_automatic_size_is_logged_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="slimgpt.layerwise.memory"):
        _, report = _prune("llama")
    chosen = report.config["batch_size"]  # type: ignore[attr-defined]
    assert chosen == 8  # eight short windows fit any machine's budget
    assert any(f"calibration batch size {chosen}" in r.getMessage() for r in caplog.records)
    _, pinned = _prune("llama", batch_size=2)
    assert pinned.config["batch_size"] == 2  # type: ignore[attr-defined]


def test_size_follows_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("llama")
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[0]
    window = memory.window_bytes(adapter, layer, 32, 4)
    store = memory.store_bytes(adapter, layer, 64, 32, 4)
    cpu = torch.device("cpu")
    for windows_fitting, expected in ((1, 1), (5, 4), (17, 16), (1000, 64)):
        free = int((store + windows_fitting * window) / memory.SAFETY) + 1
        monkeypatch.setattr(memory, "available_bytes", lambda _device, free=free: free)
        assert memory.auto_batch_size(model, adapter, 64, 32, cpu, cpu) == expected
    monkeypatch.setattr(memory, "available_bytes", lambda _device: 0)
    assert memory.auto_batch_size(model, adapter, 64, 32, cpu, cpu) == 1  # never below one window
    assert memory.auto_batch_size(model, adapter, 64, 4096, cpu, cpu) == 1


def test_ffn_inputs_not_kept_when_they_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _prune("llama-gqa", batch_size=4)
    monkeypatch.setattr(capture, "fits_in_memory", lambda _nbytes, _device: False)
    _assert_same_pruning(kept, _prune("llama-gqa", batch_size=4))  # propagation runs the FFN half instead


def test_resume_uses_the_checkpointed_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = PruneConfig(ratio=0.4, nsamples=8, seqlen=32, batch_size=2)
    prune_model(make_model("llama"), config, calibration(), checkpoint_dir=tmp_path / "ck", progress=False,
                stop_after_layer=0)
    assert memory.saved_batch_size(tmp_path / "ck", resume=True) == 2
    assert memory.saved_batch_size(tmp_path / "ck", resume=False) is None
    assert memory.saved_batch_size(tmp_path / "none", resume=True) is None


def test_config_accepts_auto_and_refuses_negative() -> None:
    assert PruneConfig().batch_size == memory.AUTO_BATCH
    with pytest.raises(ConfigError, match="--batch-size"):
        PruneConfig(batch_size=-1)
