"""The baselines (slimgpt.baselines) on SlimGPT's driver: target size, exact save/reload, each method's maths."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import slimgpt
from conftest import FAMILIES, calibration, make_model, probe
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError
from slimgpt.methods import PruneJob, get_method
from slimgpt.methods.llm_pruner import llm_pruner_layers, taylor_importance
from slimgpt.methods.wanda_sp import WandaSPMethod
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import layer_geometry
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.scores import (
    attention_group_sums,
    drop_columns,
    flap_bias,
    global_counts,
    lowest_units,
    wanda_sp_scores,
)

METHODS = ["magnitude", "wanda-sp", "flap", "llm-pruner"]


def _config(method: str, **overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method=method, ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def deep_model(family: str, n_layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """conftest's tiny model of ``family`` with more layers: LLM-Pruner keeps the first and last layer,
    so 3 layers cannot lose 50% of their parameters."""
    config = make_model(family).config.to_dict()
    config.update(num_hidden_layers=n_layers)
    config.pop("layer_types", None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(type(make_model(family).config)(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _model(method: str, family: str) -> torch.nn.Module:
    return deep_model(family) if method == "llm-pruner" else make_model(family)


def _slack(model: torch.nn.Module, policy: str, decoder_params: int) -> float:
    """One attention unit of layer 0, as a fraction of the decoder: how close a whole-unit plan can get."""
    adapter = get_adapter(model.config)
    return layer_geometry(adapter, adapter.decoder_layers(model)[0], policy).params_per_attn_unit / decoder_params


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("method", METHODS)
def test_prune_save_reload_identical(method: str, ratio: float, family: str, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _model(method, family)
    dense = copy.deepcopy(model)
    report = prune_model(model, _config(method, ratio=ratio), calibration(), progress=False)
    assert report.method == method
    assert abs(report.realised_ratio - ratio) <= _slack(dense, "kv-group", report.decoder_params_before)
    x = probe()
    logits = model(x).logits
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__.startswith("Slim")
    assert torch.allclose(reloaded(x).logits, logits, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
    assert not torch.allclose(dense(x).logits, logits, atol=1e-3)  # something was really removed
    card = (out / "README.md").read_text()
    assert f"({method})" in card and "Ratio convention" in card and report.ratio_convention in card
    if method == "flap" and family != "opt":  # LLaMA-like layers got o_proj / down_proj biases to hold FLAP's
        assert reloaded.config.layer_output_bias
        adapter = get_adapter(reloaded.config)
        assert all(adapter.attn_output(layer).bias is not None and adapter.mlp_output(layer).bias is not None
                   for layer in adapter.decoder_layers(reloaded))


@pytest.mark.parametrize("method", METHODS)
def test_query_heads_policy_keeps_every_kv_head(method: str) -> None:
    model = _model(method, "llama-gqa")
    report = prune_model(model, _config(method, ratio=0.5, gqa_policy="query-heads"), calibration(), progress=False)
    assert abs(report.realised_ratio - 0.5) <= _slack(_model(method, "llama-gqa"), "query-heads",
                                                      report.decoder_params_before)
    assert any(row.heads_kept < row.heads_total for row in report.layers)
    for row in report.layers:
        assert row.kv_heads_kept == row.kv_heads_total
        per_group = torch.tensor(row.kept_heads) // (row.heads_total // row.kv_heads_total)
        assert len(set(per_group.bincount().tolist())) == 1  # every KV group keeps as many query heads
    assert model(probe()).logits.isfinite().all()


# --- magnitude ------------------------------------------------------------------------------------------

def test_magnitude_removes_the_smallest_norm_head_without_data() -> None:
    model = make_model("llama")
    layer = model.model.layers[0]
    rows = slice(2 * 16, 3 * 16)  # head 2 (head_dim 16)
    with torch.no_grad():
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            linear.weight[rows] *= 0.01
        layer.self_attn.o_proj.weight[:, rows] *= 0.01
    # No calibration and no tokenizer: magnitude needs no data and runs no calibration pass.
    report = prune_model(model, _config("magnitude", ratio=0.2), progress=False)
    assert report.layers[0].heads_kept == 3 and 2 not in report.layers[0].kept_heads
    assert report.calibration["nsamples"] == 0 and "calibration_forward" not in report.stage_seconds
    # Calibration windows given anyway are ignored.
    again = prune_model(make_model("llama"), _config("magnitude", ratio=0.2), calibration(), progress=False)
    assert again.calibration["nsamples"] == 0


# --- wanda-sp -------------------------------------------------------------------------------------------

def test_wanda_sp_score_matches_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(10, 12, generator=generator)
    X = torch.randn(40, 12, generator=generator) * torch.linspace(0.1, 3.0, 12)
    units = torch.arange(12).view(3, 4)  # three "heads" of four columns
    stats = InputStatistics(12, "cpu", full=False)
    stats.add(X[:25])
    stats.add(X[25:])
    by_hand = torch.stack([
        sum((W[:, j].abs() * X[:, j].norm()).mean() for j in unit.tolist()) for unit in units
    ])
    norms = WandaSPMethod._norms(stats)
    assert torch.allclose(norms, X.norm(dim=0), rtol=1e-5)
    assert torch.allclose(wanda_sp_scores(W, norms, units), by_hand, rtol=1e-5)
    method = get_method(_config("wanda-sp"))
    decision = method.prune_attention(PruneJob(W, stats, units, rounds=1))
    assert decision.removed_units == [int(by_hand.argmin())]
    assert torch.equal(decision.weight, drop_columns(W, units, decision.removed_units))


# --- FLAP -----------------------------------------------------------------------------------------------

def test_flap_bias_keeps_the_mean_output() -> None:
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    X = torch.randn(100, 16, generator=generator, dtype=torch.float64) + torch.linspace(-2, 2, 16)
    units = torch.arange(16).view(8, 2)
    removed = [1, 4, 6]
    pruned = drop_columns(W, units, removed)
    b = flap_bias(W, X.mean(0), units[removed].flatten())
    assert torch.allclose((X @ pruned.T + b).mean(0), (X @ W.T).mean(0), atol=1e-12)
    assert not torch.allclose((X @ pruned.T).mean(0), (X @ W.T).mean(0), atol=1e-3)


def _linear_inputs(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every o_proj / down_proj input of ``model`` on ``windows``, tokens flattened."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for name, module in model.named_modules()
        if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        for start in range(0, len(windows), 4):
            model(windows[start:start + 4])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in inputs.items()}


def test_flap_compensation_keeps_every_layer_output_mean() -> None:
    model = make_model("llama")
    dense = copy.deepcopy(model)
    report = prune_model(model, _config("flap", ratio=0.4), calibration(), compact=False, progress=False)
    assert len({row.ffn_kept for row in report.layers}) > 1  # global ranking: per-layer widths differ
    modules = dict(model.named_modules())
    dense_modules = dict(dense.named_modules())
    checked = 0
    for name, x in _linear_inputs(model, calibration()).items():
        pruned, original = modules[name], dense_modules[name]
        if torch.equal(pruned.weight, original.weight):
            continue
        checked += 1
        assert (pruned.weight != original.weight).any(dim=0).sum() > 0 and pruned.bias.abs().max() > 0
        mean_pruned = F.linear(x, pruned.weight, pruned.bias).mean(0)
        mean_dense = F.linear(x, original.weight, original.bias).mean(0)
        assert torch.allclose(mean_pruned, mean_dense, atol=1e-5), name
        assert not torch.allclose(F.linear(x, pruned.weight).mean(0), mean_dense, atol=1e-5)
    assert checked >= 4


def test_flap_global_ranking_takes_the_lowest_scores_across_modules() -> None:
    scores = [torch.tensor([-1.0, -0.5, 2.0]), torch.tensor([0.0, 0.1, 3.0])]
    assert global_counts(scores, [1, 1], [2, 2], goal=3) == [2, 1]
    assert global_counts(scores, [1, 1], [2, 2], goal=4) == [2, 2]  # module 0 is capped
    # Items count by their size; the cut is a score threshold, on the side of the crossing nearer the goal.
    assert global_counts(scores, [10, 1], [2, 2], goal=12) == [1, 0]
    assert global_counts(scores, [10, 1], [2, 2], goal=17) == [2, 0]
    assert global_counts(scores, [10, 1], [2, 2], goal=21) == [2, 1]
    with pytest.raises(ConfigError, match="ratio"):
        global_counts(scores, [1, 1], [2, 2], goal=5)


def test_flap_resume_restores_the_added_biases(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config("flap", ratio=0.4)
    reference = make_model("llama")
    prune_model(reference, config, calibration(), progress=False)
    prune_model(make_model("llama"), config, calibration(), checkpoint_dir=tmp_path / "ckpt", stop_after_layer=0,
                progress=False)
    resumed = make_model("llama")
    prune_model(resumed, config, calibration(), checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


# --- LLM-Pruner -----------------------------------------------------------------------------------------

def test_llm_pruner_keeps_first_and_last_layers() -> None:
    assert llm_pruner_layers(32) == range(4, 30)  # the authors' layers 4..29 of LLaMA-7B
    assert llm_pruner_layers(3) == range(1, 2)
    model = deep_model("llama-gqa")
    dense = copy.deepcopy(model)
    report = prune_model(model, _config("llm-pruner", ratio=0.5), calibration(), progress=False)
    n = len(report.layers)
    for index in (0, n - 1):
        dense_state, state = dense.model.layers[index].state_dict(), model.model.layers[index].state_dict()
        assert dense_state.keys() == state.keys()
        assert all(torch.equal(dense_state[k], state[k]) for k in state)
    assert all(row.ffn_kept < row.ffn_total for row in report.layers[1:-1])
    assert "LLM-Pruner" in report.ratio_convention and "1..4" in report.ratio_convention
    with pytest.raises(ConfigError, match="first and last"):
        prune_model(make_model("llama"), _config("llm-pruner", ratio=0.5), calibration(), progress=False)


@pytest.mark.parametrize(("family", "policy"), [("llama", "kv-group"), ("llama-gqa", "kv-group"),
                                                ("llama-gqa", "query-heads"), ("opt", "kv-group")])
def test_llm_pruner_importance_is_taylor_summed_over_the_group(family: str, policy: str) -> None:
    model = make_model(family)
    windows = calibration()[:3, :16]
    adapter = get_adapter(model.config)
    scores = taylor_importance(model, adapter, windows, [1], policy, batch_size=2)
    assert all(p.grad is None for p in model.parameters())

    by_hand = copy.deepcopy(model)
    by_hand(windows, labels=windows).loss.backward()
    layer = adapter.decoder_layers(by_hand)[1]
    q, k, v = ((m.weight * m.weight.grad).abs() for m in adapter.attn_inputs(layer))
    o = (adapter.attn_output(layer).weight * adapter.attn_output(layer).weight.grad).abs()
    hd = adapter.head_dim
    n_heads, n_kv = q.shape[0] // hd, k.shape[0] // hd
    group = n_heads // n_kv

    def rows(t: torch.Tensor, head: int) -> torch.Tensor:
        return t[head * hd:(head + 1) * hd].sum()

    def cols(t: torch.Tensor, head: int) -> torch.Tensor:
        return t[:, head * hd:(head + 1) * hd].sum()

    if group == 1:  # MHA: a head with its q, k, v rows and o columns
        expected = [rows(q, h) + rows(k, h) + rows(v, h) + cols(o, h) for h in range(n_heads)]
    elif policy == "kv-group":  # the group's query heads plus its k, v head
        expected = [sum(rows(q, h) + cols(o, h) for h in range(g * group, (g + 1) * group)) + rows(k, g) + rows(v, g)
                    for g in range(n_kv)]
    else:  # a query head: the shared k, v head stays
        expected = [rows(q, h) + cols(o, h) for h in range(n_heads)]
    assert torch.allclose(scores[1][0], torch.stack(expected).detach(), rtol=1e-4)

    inputs = [(m.weight * m.weight.grad).abs().sum(1) for m in adapter.mlp_inputs(layer)]
    down = adapter.mlp_output(layer)
    expected_channels = sum(inputs) + (down.weight * down.weight.grad).abs().sum(0)
    assert torch.allclose(scores[1][1], expected_channels.detach(), rtol=1e-4)
    # The pure group sum agrees with the by-hand sums too.
    kind = "head" if group == 1 else "kv-group" if policy == "kv-group" else "query-head"
    assert torch.allclose(attention_group_sums(q, k, v, o, n_heads, n_kv, kind), torch.stack(expected), rtol=1e-5)


def test_lowest_units_respects_buckets() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 9.0, 2.0])
    assert lowest_units(scores, 2) == [3, 1]
    assert sorted(lowest_units(scores, 1, [[0, 1, 2], [3, 4, 5]])) == [1, 3]


def test_cli_accepts_every_method() -> None:
    from slimgpt.cli import build_parser

    for method in METHODS:
        args = build_parser().parse_args(["prune", "m", "-o", "out", "--method", method, "--taylor-samples", "4"])
        assert args.method == method and args.taylor_samples == 4
    assert slimgpt.PruneConfig.from_json(_config("flap").to_json()) == _config("flap")
