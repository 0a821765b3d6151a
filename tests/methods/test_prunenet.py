"""PruneNet (slimgpt.methods.prunenet): uniform FFN width, stock config, seeded policy, best-KS checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, make_model, probe
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError
from slimgpt.methods import get_method
from slimgpt.methods.prunenet import PruneNetMethod, ffn_states
from slimgpt.models.families import family_row, get_adapter
from slimgpt.models.geometry import model_geometry
from slimgpt.solver.prunenet import (
    BestCheckpoint,
    PolicyResult,
    RowPolicy,
    ks_reward,
    ks_statistic,
    train_policy,
    uniform_ffn_plan,
)

EPISODES = 4  # a short policy training keeps the tests fast; the method's default is the paper's 20


class ShortPruneNet(PruneNetMethod):
    episodes = EPISODES


def _prune(model: torch.nn.Module, ratio: float, seed: int = 0):  # type: ignore[no-untyped-def]
    config = PruneConfig(method="prunenet", ratio=ratio, seed=seed)
    return prune_model(model, config, method=ShortPruneNet(config), progress=False)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_changes_nothing(family: str) -> None:
    model = make_model(family)
    dense = copy.deepcopy(model)
    report = _prune(model, 0.0)
    x = probe()
    assert torch.equal(model(x).logits, dense(x).logits)
    assert report.decoder_params_after == report.decoder_params_before
    assert type(model) is type(dense) and model.config.to_dict() == dense.config.to_dict()


def _ratios(family: str) -> list[float]:
    return [0.2] if family == "opt" else [0.2, 0.5]  # OPT's FFN (1.5 d wide here) is under half its layer


@pytest.mark.parametrize("family", FAMILIES)
def test_target_hit_uniform_width_and_stock_reload(family: str, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    for ratio in _ratios(family):
        model = make_model(family)
        dense = copy.deepcopy(model)
        adapter = get_adapter(model.config)
        per_channel = model_geometry(model, adapter, "kv-group")[0].params_per_channel
        report = _prune(model, ratio)
        step = len(report.layers) * per_channel  # one channel off every layer: the finest uniform step
        assert abs(report.realised_ratio * report.decoder_params_before - ratio * report.decoder_params_before) \
            <= step / 2
        width = report.layers[0].ffn_kept
        assert all(r.ffn_kept == width and r.heads_kept == r.heads_total for r in report.layers)
        assert width < report.layers[0].ffn_total
        x = probe()
        logits = model(x).logits
        assert not _close(dense(x).logits, logits)
        out = save_pruned(model, tokenizer, report, tmp_path / f"out{ratio}")
        saved = json.loads((out / "config.json").read_text())
        assert saved["model_type"] == dense.config.model_type  # a stock config, not slimgpt_<family>
        assert saved[family_row(saved["model_type"]).ffn_size_key] == width
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(reloaded) is type(dense)
        assert _close(reloaded(x).logits, logits)
        assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
        assert "PruneNet's compression ratio" in report.ratio_convention


def test_a_ratio_the_ffn_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match="from the FFN alone"):
        _prune(make_model("opt"), 0.5)


def test_same_seed_same_masks_and_the_global_rng_is_untouched() -> None:
    model = make_model("llama-gqa")
    rng = torch.get_rng_state()
    first = _prune(model, 0.3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    second = _prune(make_model("llama-gqa"), 0.3, seed=7)
    other = _prune(make_model("llama-gqa"), 0.3, seed=8)
    kept = [r.kept_channels for r in first.layers]
    assert kept == [r.kept_channels for r in second.layers]
    assert kept != [r.kept_channels for r in other.layers]


def test_best_checkpoint_keeps_the_lowest_score_as_a_copy() -> None:
    best = BestCheckpoint()
    state = {"w": torch.ones(2)}
    assert best.offer(0, 3.0, state)
    state["w"].add_(1)  # the checkpoint is a copy
    assert not best.offer(1, 3.0, state)  # a tie keeps the earliest
    assert best.offer(2, 1.0, {"w": torch.zeros(2)}) and not best.offer(3, 2.0, state)
    assert best.episode == 2 and best.score == 1.0 and torch.equal(best.state["w"], torch.zeros(2))


def _trained(episodes: int, seed: int = 3) -> tuple[RowPolicy, PolicyResult]:
    states = ffn_states(make_model("llama"), get_adapter(make_model("llama").config))
    generator = torch.Generator().manual_seed(seed)
    policy = RowPolicy(states[0].shape[1], states[0].shape[0], generator)
    with torch.enable_grad():
        result = train_policy(policy, states, 40, generator, episodes=episodes)
    return policy, result


def test_the_kept_policy_is_the_state_that_drew_the_lowest_ks_episode() -> None:
    policy, result = _trained(8)
    totals = [ks for ks, _ in result.history]
    assert result.best_ks == min(totals) and result.best_episode == totals.index(min(totals))
    # Training for best_episode episodes leaves the policy that drew episode best_episode, before its update.
    before, _ = _trained(result.best_episode)
    assert all(torch.equal(before.state_dict()[k], v) for k, v in result.best_state.items())
    if result.best_episode < 7:
        assert any(not torch.equal(policy.state_dict()[k], v) for k, v in result.best_state.items())


def test_ks_statistic_matches_scipy_and_the_reward() -> None:
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=generator), torch.rand(30, generator=generator) * 1.3
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a.numpy(), b.numpy()).statistic, rel=1e-12)
    assert ks_statistic(a, a) == 0 and ks_reward(0.0) == 99999.0 and ks_reward(0.25) == 4.0


def test_uniform_plan_is_the_closest_uniform_width() -> None:
    model = make_model("llama")
    geometries = model_geometry(model, get_adapter(model.config), "kv-group")
    total = sum(g.layer_params for g in geometries)
    for ratio, round_to in ((0.2, 1), (0.37, 8)):
        plan = uniform_ffn_plan(geometries, ratio, round_to)
        widths = {g.ffn_channels - p.channels_removed for g, p in zip(geometries, plan.layers, strict=True)}
        assert len(widths) == 1 and widths.pop() % round_to == 0
        assert all(p.attn_units_removed == 0 for p in plan.layers)
        best = min(abs(sum((g.ffn_channels - w) * g.params_per_channel for g in geometries) - ratio * total)
                   for w in range(round_to, 97, round_to))
        assert abs(plan.params_removed - ratio * total) == best


def test_prunenet_refuses_streaming_and_uses_no_data() -> None:
    method = get_method(PruneConfig(method="prunenet"))
    assert "--method prunenet" in method.cannot_stream() and not method.needs_data


def test_cli_accepts_prunenet() -> None:
    from slimgpt.cli import build_parser

    args = build_parser().parse_args(["prune", "m", "-o", "out", "--method", "prunenet"])
    assert args.method == "prunenet"
