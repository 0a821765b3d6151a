"""SliceGPT (slimgpt.slicegpt, slimgpt.models.sliced): invariance, target size, exact save/reload, resume, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, calibration, make_model, probe
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError, UnsupportedModelError
from slimgpt.layerwise.run import LayerHooks
from slimgpt.methods.base import ModelRun
from slimgpt.methods.slicegpt import SliceGPTMethod
from slimgpt.models.families import get_adapter
from slimgpt.models.rotate import plan_width, slice_dims_for, sliced_layer_params
from slimgpt.models.sliced import layer_widths
from slimgpt.solver.pca import Covariance, principal_directions


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method="slicegpt", ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def _sliced_params(model: torch.nn.Module, width: int) -> int:
    adapter = get_adapter(model.config)
    layers = list(adapter.decoder_layers(model))
    dims = slice_dims_for(len(layers), width, adapter.hidden_size)
    return sum(sliced_layer_params(adapter, layer, layer_widths(dims, i)) for i, layer in enumerate(layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_rotation_keeps_the_function(family: str) -> None:
    """Folding the norms, rotating every block and adding shortcuts changes nothing at full width."""
    model = make_model(family)
    dense = copy.deepcopy(model)
    SliceGPTMethod(_config(), width=model.config.hidden_size).run(model, calibration(), ModelRun(progress=False))
    x = probe()
    assert torch.allclose(model(x).logits, dense(x).logits, atol=1e-4)
    layer = get_adapter(model.config).decoder_layers(model)[0]
    assert layer.attn_shortcut.weight.shape == (model.config.hidden_size,) * 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_slice_save_reload_identical(family: str, ratio: float, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    dense = copy.deepcopy(model)
    report = prune_model(model, _config(ratio=ratio), calibration(), progress=False)
    width = report.schedule["slice_dims"][0]
    step = (_sliced_params(dense, width) - _sliced_params(dense, width - 1)) / report.decoder_params_before
    assert abs(report.realised_ratio - ratio) <= step  # within one hidden dimension of the target
    assert report.decoder_params_after == _sliced_params(dense, width)
    x = probe()
    logits = model(x).logits
    assert not torch.allclose(dense(x).logits, logits, atol=1e-3)
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.slice_dims == report.schedule["slice_dims"]
    assert torch.allclose(reloaded(x).logits, logits, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
    card = (out / "README.md").read_text()
    assert "(slicegpt)" in card and report.ratio_convention in card and "hidden width sliced" in card


def test_sliced_model_generates_with_and_without_cache() -> None:
    model = make_model("llama-gqa")
    prune_model(model, _config(ratio=0.3), calibration(), progress=False)
    x = probe()[:, :8]
    cached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_plan_width_is_closest_to_the_target() -> None:
    model = make_model("llama")
    adapter = get_adapter(model.config)
    layers = list(adapter.decoder_layers(model))
    before = sum(p.numel() for layer in layers for p in layer.parameters())
    for ratio in (0.1, 0.25, 0.5, 0.8):
        width = plan_width(adapter, layers, ratio)
        target = before * (1 - ratio)
        best = min(range(1, model.config.hidden_size + 1), key=lambda w: abs(_sliced_params(model, w) - target))
        assert abs(_sliced_params(model, width) - target) == abs(_sliced_params(model, best) - target)
    assert plan_width(adapter, layers, 0.5, round_to=8) % 8 == 0


def test_principal_directions_are_sorted_and_orthogonal() -> None:
    torch.manual_seed(0)
    signal = torch.randn(500, 6) * torch.tensor([1.0, 5.0, 0.1, 3.0, 0.5, 2.0])
    cov = Covariance(6, torch.device("cpu"))
    cov.add(signal)
    basis = principal_directions(cov.matrix)
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    variances = ((cov.matrix @ basis) * basis).sum(0)  # q^T C q per direction
    assert bool((variances[:-1] >= variances[1:]).all())
    assert basis[:, 0].abs().argmax().item() == 1  # the widest input axis comes first


def test_slicing_keeps_the_dominant_subspace() -> None:
    """Dropping directions the calibration signal never uses costs almost nothing; dropping used ones costs."""
    torch.manual_seed(0)
    model = make_model("llama")
    with torch.no_grad():  # the embeddings (the stream's only source before layer 0) span 40 of 64 dims
        embedding = model.get_input_embeddings().weight
        embedding.copy_(embedding[:, :40] @ torch.randn(40, embedding.shape[1]) / 6)
    norms = model.get_input_embeddings().weight.norm(dim=1)
    x = probe()
    ref = model(x).logits
    errors = []
    for width in (40, 56, 24):
        sliced = copy.deepcopy(model)
        SliceGPTMethod(_config(), width=width).run(sliced, calibration(), ModelRun(progress=False))
        kept = sliced.get_input_embeddings().weight.norm(dim=1)  # rotation keeps norms; slicing drops the rest
        assert torch.allclose(kept, norms, rtol=1e-4) == (width >= 40)
        errors.append((sliced(x).logits - ref).abs().mean().item())
    assert errors[0] < errors[2] and errors[1] < errors[2]


def test_resume_after_a_crash_is_bit_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(ratio=0.4)
    whole = make_model("opt")
    prune_model(whole, config, calibration(), progress=False)
    crashed = make_model("opt")
    prune_model(crashed, config, calibration(), checkpoint_dir=tmp_path, progress=False, stop_after_layer=0)
    resumed = make_model("opt")
    prune_model(resumed, config, calibration(), checkpoint_dir=tmp_path, resume=True, progress=False)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="other options"):
        prune_model(make_model("opt"), _config(ratio=0.3), calibration(), checkpoint_dir=tmp_path, resume=True,
                    progress=False)


def test_post_norm_opt_is_refused_before_any_work() -> None:
    model = make_model("opt")
    model.config.do_layer_norm_before = False
    dense = copy.deepcopy(model)
    with pytest.raises(UnsupportedModelError, match="pre-norm"):
        prune_model(model, _config(), calibration(), progress=False)
    for a, b in zip(model.parameters(), dense.parameters(), strict=True):
        assert torch.equal(a, b)


class _StreamingHooks(LayerHooks):
    streams_weights = True


def test_streaming_is_refused() -> None:
    with pytest.raises(ConfigError, match="whole model in memory"):
        prune_model(make_model("llama"), _config(), calibration(), progress=False, layer_hooks=_StreamingHooks())


def test_export_refuses_a_sliced_model(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from slimgpt.cli import main

    model = make_model("llama")
    report = prune_model(model, _config(), calibration(), progress=False)
    out = save_pruned(model, tokenizer, report, tmp_path / "sliced")
    assert main(["export", str(out), "--format", "llama-padded", "-o", str(tmp_path / "padded")]) != 0
    assert not (tmp_path / "padded").exists()
