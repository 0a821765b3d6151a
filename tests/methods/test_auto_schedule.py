"""SlimGPT's ``--schedule auto``: the budget, the caps, determinism, resume and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, calibration, make_model
from slimgpt import PruneConfig, prune_model
from slimgpt.errors import ConfigError
from slimgpt.methods import get_method
from slimgpt.methods.auto_schedule import plan_auto
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import decoder_params, model_geometry
from slimgpt.solver.schedule import plan_schedule


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(ratio=0.3, schedule="auto", nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig.from_dict(values)


@pytest.mark.parametrize("policy", ["kv-group", "query-heads"])
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_is_hit_for_every_family_and_policy(family: str, policy: str) -> None:
    model = make_model(family)
    adapter = get_adapter(model.config)
    config = _config(gqa_policy=policy, ratio=0.35)
    plan = plan_auto(model, adapter, calibration(), config)
    geometries = model_geometry(model, adapter, policy)
    goal = config.ratio * plan.total_params
    step = max(g.params_per_channel for g in geometries)
    assert abs(plan.params_removed - goal) <= step / 2
    log_increase = plan_schedule(geometries, config.ratio, round_to=1)  # the paper schedule's precision
    assert abs(plan.params_removed - goal) <= max(step / 2, abs(log_increase.params_removed - goal))
    for layer, g in zip(plan.layers, geometries, strict=True):
        assert 0 <= layer.attn_units_removed <= g.attn_units - 1
        assert 0 <= layer.channels_removed <= g.ffn_channels - 1
        assert layer.params_removed == (layer.attn_units_removed * g.params_per_attn_unit
                                        + layer.channels_removed * g.params_per_channel)
    assert plan.schedule == "auto" and len(plan.details["attn_sensitivity"]) == len(geometries)


def test_round_to_keeps_widths_multiples() -> None:
    model = make_model("llama")
    plan = plan_auto(model, get_adapter(model.config), calibration(), _config(round_to=8))
    assert all((96 - p.channels_removed) % 8 == 0 and p.channels_removed <= 88 for p in plan.layers)


def test_plan_is_deterministic() -> None:
    first = plan_auto(make_model("qwen2"), get_adapter(make_model("qwen2").config), calibration(), _config())
    second = plan_auto(make_model("qwen2"), get_adapter(make_model("qwen2").config), calibration(), _config())
    assert first == second


def test_plan_reads_only_the_planning_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With PLAN_FRACTION below 1 the plan measures the first windows only (at least the sensitivity
    windows): changing the others changes nothing, and the report says how many it used."""
    from slimgpt.methods import auto_schedule
    from slimgpt.methods.auto_schedule import SENSITIVITY_TOKENS

    monkeypatch.setattr(auto_schedule, "PLAN_FRACTION", 0.25)
    PLAN_FRACTION = 0.25

    model = make_model("llama")
    adapter = get_adapter(model.config)
    windows = calibration(n=24, seqlen=64)
    config = _config(nsamples=24, seqlen=64)
    plan = plan_auto(model, adapter, windows, config)
    sensitivity = SENSITIVITY_TOKENS // 64
    planning = max(sensitivity, math.ceil(PLAN_FRACTION * 24))
    assert plan.details["planning_windows"] == planning < 24
    assert plan.details["sensitivity_windows"] == sensitivity
    other = windows.clone()
    other[planning:] = calibration(n=24 - planning, seqlen=64, seed=7)
    assert plan_auto(model, adapter, other, config) == plan
    other[planning - 1] = other[planning]
    assert plan_auto(model, adapter, other, config).details != plan.details


def test_plan_windows_stop_at_enough_tokens_per_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many calibration windows there are, the planning pass reads only as many as hold
    PLAN_TOKENS_PER_INPUT tokens per input of the widest o_proj / down_proj."""
    from slimgpt.methods import auto_schedule

    model = make_model("llama")
    adapter = get_adapter(model.config)
    widest = max(max(adapter.attn_output(layer).in_features, adapter.mlp_output(layer).in_features)
                 for layer in adapter.decoder_layers(model))
    monkeypatch.setattr(auto_schedule, "PLAN_TOKENS_PER_INPUT", 2)
    monkeypatch.setattr(auto_schedule, "SENSITIVITY_TOKENS", 16)
    windows = calibration(n=40, seqlen=16)
    plan = plan_auto(model, adapter, windows, _config(nsamples=40, seqlen=16))
    assert plan.details["sensitivity_windows"] == 1
    assert plan.details["planning_windows"] == math.ceil(2 * widest / 16) < 40


def test_prune_reports_the_allocation_and_lands_on_it() -> None:
    model = make_model("llama-gqa")
    before = decoder_params(model, get_adapter(model.config))
    report = prune_model(model, _config(gqa_policy="query-heads"), calibration(), progress=False)
    schedule = report.schedule
    assert schedule["name"] == "auto" and "sensitivity" in schedule["method"].lower()
    removed = [r.params_before - r.params_after for r in report.layers]
    assert before - decoder_params(model, get_adapter(model.config)) == sum(removed)
    assert [r.ffn_total - r.ffn_kept for r in report.layers] == schedule["channels_removed"]
    assert len(schedule["ratios"]) == 3 and abs(report.realised_ratio - 0.3) < 0.02


def test_resume_reaches_the_same_model(tmp_path: Path) -> None:
    config = _config(ratio=0.4)
    reference = make_model("llama")
    prune_model(reference, config, calibration(), progress=False)
    crashed = make_model("llama")
    prune_model(crashed, config, calibration(), checkpoint_dir=tmp_path / "ckpt", stop_after_layer=0, progress=False)
    resumed = make_model("llama")
    prune_model(resumed, config, calibration(), checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


def test_refusals() -> None:
    assert "--schedule auto" in get_method(_config()).cannot_stream()
    assert get_method(_config(schedule="log-increase")).cannot_stream() == ""
    with pytest.raises(ConfigError, match="--method slimgpt"):
        _config(method="flap")
    with pytest.raises(ConfigError, match="auto schedule is measured"):
        plan_schedule(model_geometry(make_model("llama"), get_adapter(make_model("llama").config), "kv-group"),
                      0.3, "auto")


@pytest.mark.parametrize("head", ["whole", "top tokens"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "opt-post-norm"])
def test_staircase_divergences_match_one_forward_per_probe(family: str, head: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each probe's copy starts at its own layer from the dense activations (from the FFN half's inputs
    where they are known) and shares the later layers' calls with the other copies, yet gets the KL of one
    full forward with only its own module changed; also through the top-token KL (every token of these
    small vocabularies among the top ones, so exact)."""
    import torch.nn.functional as F

    from slimgpt.methods import auto_sensitivity
    from slimgpt.methods.auto_sensitivity import dense_run, staircase_divergences

    used: list[int] = []
    if head == "top tokens":
        monkeypatch.setattr(auto_sensitivity, "TOP_VOCAB", 0)
        real = auto_sensitivity.TopKDivergence
        monkeypatch.setattr(auto_sensitivity, "TopKDivergence", lambda *a: used.append(1) or real(*a))

    model = make_model(family)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    g = torch.Generator().manual_seed(0)
    where = [(0, 0), (0, 1), (1, 1), (2, 0), (2, 1)]  # (layer, module): 0 o_proj, 1 down_proj
    linears = [(adapter.attn_output(layers[i]), adapter.mlp_output(layers[i]))[m] for i, m in where]
    probes = [(i, m, 0.05 * torch.randn(linear.weight.shape, generator=g))
              for (i, m), linear in zip(where, linears, strict=True)]
    config = _config(batch_size=3)
    windows = calibration()[:3]
    with torch.no_grad():
        dense = dense_run(model, adapter, calibration(), len(windows), config)  # sensitivity windows: the first 3
        stair = staircase_divergences(model, adapter, windows, dense, probes, config)
        chunked = staircase_divergences(model, adapter, windows, dense, probes, _config(batch_size=3), per_call=2)
        p = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
        for linear, (_, _, delta), got, small in zip(linears, probes, stair, chunked, strict=True):
            handle = linear.register_forward_hook(lambda _m, a, out, d=delta: out + F.linear(a[0], d))
            q = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
            handle.remove()
            expected = float((p.exp() * (p - q)).sum()) / windows.numel()
            assert expected > 0
            assert got == pytest.approx(expected, rel=1e-3) and small == pytest.approx(expected, rel=1e-3)
    assert bool(used) == (head == "top tokens")
