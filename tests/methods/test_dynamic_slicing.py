"""Dynamic slicing (slimgpt.methods.dynamic_slicing): exactness, target size, reload, SliceGPT at zero spread."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, calibration, make_model, probe, rel_close
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError
from slimgpt.layerwise.run import LayerHooks
from slimgpt.methods import dynamic_slicing
from slimgpt.methods.base import ModelRun
from slimgpt.methods.dynamic_slicing import (
    DynamicSlicingMethod,
    block_influence,
    plan_dynamic_dims,
    redundancy,
    slice_fractions,
)
from slimgpt.models.families import get_adapter
from slimgpt.models.rotate import plan_width, slice_dims_for, sliced_layer_params
from slimgpt.models.sliced import layer_widths


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method="dynamic-slicing", ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def _params(model: torch.nn.Module, dims: list[int]) -> int:
    adapter = get_adapter(model.config)
    layers = list(adapter.decoder_layers(model))
    return sum(sliced_layer_params(adapter, layer, layer_widths(dims, i)) for i, layer in enumerate(layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_keeps_the_function(family: str) -> None:
    model = make_model(family)
    dense = copy.deepcopy(model)
    method = DynamicSlicingMethod(_config(ratio=0.0), width=model.config.hidden_size)
    method.run(model, calibration(), ModelRun(progress=False))
    x = probe()
    assert rel_close(model(x).logits, dense(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_target_size_and_save_reload(family: str, ratio: float, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    dense = copy.deepcopy(model)
    report = prune_model(model, _config(ratio=ratio), calibration(), progress=False)
    dims = report.schedule["slice_dims"]
    assert len(set(dims[:-1])) > 1 and dims[-1] == model.config.hidden_size  # per-layer widths, head unsliced
    assert all(dims[2 * i] == dims[2 * i + 1] for i in range(len(dims) // 2))
    assert report.decoder_params_after == _params(dense, dims)
    one_less = [d - 1 for d in dims[:-1]] + dims[-1:]
    step = (_params(dense, dims) - _params(dense, one_less)) / report.decoder_params_before
    assert abs(report.realised_ratio - ratio) <= step  # within one hidden dimension per layer of the target
    x = probe()
    logits = model(x).logits
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.slice_dims == dims
    assert torch.equal(reloaded(x).logits, logits)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
    card = (out / "README.md").read_text()
    assert "(dynamic-slicing)" in card and report.ratio_convention in card and "average slicing" in card


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_spread_is_slicegpt_bit_for_bit(family: str) -> None:
    sliced, dynamic = make_model(family), make_model(family)
    expected = prune_model(sliced, _config(method="slicegpt", ratio=0.3), calibration(), progress=False)
    got = prune_model(dynamic, _config(ratio=0.3), calibration(), progress=False,
                      method=DynamicSlicingMethod(_config(ratio=0.3), spread=0.0))
    assert got.schedule["slice_dims"] == expected.schedule["slice_dims"]
    for (name, a), (_, b) in zip(sliced.state_dict().items(), dynamic.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = probe()
    assert torch.equal(sliced(x).logits, dynamic(x).logits)


def test_equal_redundancies_are_slicegpt_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dynamic_slicing, "block_influence", lambda *args: [0.3, 0.3, 0.3])
    sliced, dynamic = make_model("llama-gqa"), make_model("llama-gqa")
    prune_model(sliced, _config(method="slicegpt", ratio=0.4), calibration(), progress=False)
    report = prune_model(dynamic, _config(ratio=0.4), calibration(), progress=False)
    assert report.schedule["redundancy"] == [1.0, 1.0, 1.0]
    for a, b in zip(sliced.state_dict().values(), dynamic.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("round_to", [1, 8, 24])
def test_zero_spread_plans_slicegpts_width(family: str, round_to: int) -> None:
    model = make_model(family)
    adapter = get_adapter(model.config)
    layers = list(adapter.decoder_layers(model))
    for ratio in (0.0, 0.05, 0.1, 0.25, 0.33, 0.5, 0.8, 0.95):
        width = plan_width(adapter, layers, ratio, round_to)
        for redundancies, spread in (([0.0, 0.7, 1.0], 0.0), ([1.0, 1.0, 1.0], 0.5)):
            dims, _ = plan_dynamic_dims(adapter, layers, redundancies, ratio, spread, round_to)
            assert dims == slice_dims_for(len(layers), width, adapter.hidden_size), (ratio, redundancies)


def test_the_authors_formula() -> None:
    assert redundancy([0.2, 0.4, 0.0]) == pytest.approx([0.5, 0.0, 1.0])
    assert redundancy([0.1, 0.1]) == [1.0, 1.0]
    r = [0.5, 0.0, 1.0, 0.25]
    mu, spread = 0.3, 0.4
    fractions = slice_fractions(r, mu, spread)
    a, mean_r = spread * mu, sum(r) / len(r)
    assert fractions == pytest.approx([(mu - a) + a * x / mean_r for x in r])  # (mu - a) + a r / mean(r)
    assert sum(fractions) / len(fractions) == pytest.approx(mu)
    assert slice_fractions([0.0, 1.0], 0.8, 1.0) == [0.0, 0.9]  # clipped at 90% sliced


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_an_identity_layer_has_no_influence_and_is_sliced_most(family: str) -> None:
    model = make_model(family)
    adapter = get_adapter(model.config)
    layers = list(adapter.decoder_layers(model))
    with torch.no_grad():  # layer 1 writes nothing into the stream: its output is its input
        for linear in (adapter.attn_output(layers[1]), adapter.mlp_output(layers[1])):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    windows = calibration()
    influence = block_influence(model, adapter, windows, _config(), torch.device("cpu"))
    assert influence[1] < 1e-12 and min(influence[0], influence[2]) > 1e-3
    with torch.no_grad():
        states = model(windows, output_hidden_states=True).hidden_states  # layer l's input is states[l]
    direct = 1 - torch.nn.functional.cosine_similarity(states[0].double(), states[1].double(), dim=-1).mean()
    assert influence[0] == pytest.approx(float(direct), rel=1e-5)
    r = redundancy(influence)
    assert r[1] == 1.0
    dims, _ = plan_dynamic_dims(adapter, layers, r, 0.3, 0.5)
    widths = dims[0:-1:2]
    assert widths[1] < min(widths[0], widths[2])


def test_resume_after_a_crash_is_bit_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(ratio=0.4)
    whole = make_model("opt")
    prune_model(whole, config, calibration(), progress=False)
    prune_model(make_model("opt"), config, calibration(), checkpoint_dir=tmp_path, progress=False, stop_after_layer=0)
    resumed = make_model("opt")
    prune_model(resumed, config, calibration(), checkpoint_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_spread_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="spread"):
        DynamicSlicingMethod(_config(), spread=1.5)


class _StreamingHooks(LayerHooks):
    streams_weights = True


def test_streaming_and_export_are_refused(tmp_path, tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]
    from slimgpt.cli import main

    with pytest.raises(ConfigError, match=r"dynamic-slicing .*whole model in memory"):
        prune_model(make_model("llama"), _config(), calibration(), progress=False, layer_hooks=_StreamingHooks())
    model = make_model("llama")
    report = prune_model(model, _config(), calibration(), progress=False)
    out = save_pruned(model, tokenizer, report, tmp_path / "sliced")
    capsys.readouterr()
    assert main(["export", str(out), "--format", "llama-padded", "-o", str(tmp_path / "padded")]) != 0
    assert not (tmp_path / "padded").exists()
    err = capsys.readouterr().err.strip()
    assert "--method dynamic-slicing" in err and len(err.splitlines()) == 1
