"""FASP (slimgpt.methods.fasp) and the least-squares restoration (slimgpt.solver.restore): ratio 0 is exact,
the target size is hit, save/reload is exact, the restoration is the least-squares optimum and, with
SlimGPT's removed set, reproduces SlimGPT's compensated weights."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, assert_stream_matches_memory, calibration, make_model, probe, rel_close
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.methods import get_method
from slimgpt.methods.fasp import FASPMethod, fasp_scores
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import layer_geometry
from slimgpt.solver.hessian import prepare_hessian
from slimgpt.solver.obs import make_solver
from slimgpt.solver.restore import restore_least_squares
from slimgpt.solver.structured import greedy_remove_units, group_sizes, remove_channels


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method="fasp", ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def _slack(model: torch.nn.Module, decoder_params: int) -> float:
    """One attention unit of layer 0 as a fraction of the decoder: how close a whole-unit plan can get."""
    adapter = get_adapter(model.config)
    return layer_geometry(adapter, adapter.decoder_layers(model)[0], "kv-group").params_per_attn_unit / decoder_params


def test_fasp_is_registered_with_its_texts() -> None:
    method = get_method(_config())
    assert isinstance(method, FASPMethod) and method.needs_hessian
    assert "whole heads" in method.card_options(_config().to_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_changes_nothing(family: str) -> None:
    model = make_model(family)
    x = probe()
    dense = model(x).logits
    report = prune_model(model, _config(ratio=0.0), calibration(), progress=False)
    assert all(row.heads_kept == row.heads_total and row.ffn_kept == row.ffn_total for row in report.layers)
    assert rel_close(model(x).logits, dense, 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_target_size_and_save_reload_identical(family: str, ratio: float, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    dense = copy.deepcopy(model)
    report = prune_model(model, _config(ratio=ratio), calibration(), progress=False)
    assert report.method == "fasp"
    assert abs(report.realised_ratio - ratio) <= _slack(dense, report.decoder_params_before)
    assert "FASP's per-layer pruning ratio" in report.ratio_convention
    errors = [(getattr(row, f"{part}_error"), getattr(row, f"{part}_error_uncompensated"))
              for row in report.layers for part in ("attn", "ffn")]
    errors = [pair for pair in errors if pair[0] is not None]  # a layer part that lost nothing has none
    assert errors and all(restored <= dropped for restored, dropped in errors)  # restoring never hurts
    x = probe()
    logits = model(x).logits
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__.startswith("Slim")
    assert rel_close(reloaded(x).logits, logits, 1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
    assert not rel_close(dense(x).logits, logits, 1e-3)  # something was really removed
    card = (out / "README.md").read_text()
    assert "(fasp)" in card and report.ratio_convention in card


def test_query_heads_policy_keeps_every_kv_head() -> None:
    model = make_model("llama-gqa")
    report = prune_model(model, _config(ratio=0.5, gqa_policy="query-heads"), calibration(), progress=False)
    assert any(row.heads_kept < row.heads_total for row in report.layers)
    for row in report.layers:
        assert row.kv_heads_kept == row.kv_heads_total
        per_group = torch.tensor(row.kept_heads) // (row.heads_total // row.kv_heads_total)
        assert len(set(per_group.bincount().tolist())) == 1
    assert model(probe()).logits.isfinite().all()


def test_fasp_score_is_the_column_sum_of_wanda_scores() -> None:
    torch.manual_seed(0)
    W, X = torch.randn(5, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    diagonal = 2 * X.square().mean(0)  # diag(H) of InputStatistics: 2 E[x^2]
    units = torch.arange(6).view(3, 2)
    expected = torch.tensor([sum(abs(W[i, j]) * X[:, j].norm() for i in range(5) for j in unit)
                             for unit in units.tolist()])
    assert rel_close(fasp_scores(W, diagonal, 40, units), expected.to(torch.float64), 1e-12)


def _problem(seed: int = 0, d_out: int = 7, d_in: int = 12, tokens: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    X = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64)
    X[:, 3] *= 0.05  # uneven input scales, as in real activations
    return W, X


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_restoration_is_the_least_squares_optimum(damp: float) -> None:
    W, X = _problem()
    H = 2 * X.t() @ X
    keep = torch.tensor([0, 2, 3, 5, 6, 9, 10])
    lam = damp * float(H.diagonal().mean())
    # min ||X W^T - X_M B||^2 + lam / 2 ||B||^2 (H = 2 X^T X), as an explicit stacked least-squares problem.
    A = torch.cat([X[:, keep], (lam / 2) ** 0.5 * torch.eye(len(keep), dtype=X.dtype)])
    b = torch.cat([X @ W.t(), torch.zeros(len(keep), W.shape[0], dtype=X.dtype)])
    expected = torch.zeros_like(W)
    expected[:, keep] = torch.linalg.lstsq(A, b).solution.t()
    restored = restore_least_squares(W, H, keep, damp=damp)
    assert rel_close(restored, expected, 1e-9)
    mask = torch.zeros(W.shape[1], dtype=torch.bool)
    mask[keep] = True
    assert torch.equal(restore_least_squares(W, H, mask, damp=damp), restored)  # a mask means the same
    assert restored.dtype == W.dtype
    assert rel_close(restore_least_squares(W.float(), H.float(), keep, damp=damp), expected, 1e-5)  # float32 in


def test_restoration_zeroes_dead_inputs_and_keeps_a_full_set_without_damping() -> None:
    W, X = _problem()
    X[:, 4] = 0  # a dead input
    H = 2 * X.t() @ X / X.shape[0]
    restored = restore_least_squares(W, H, torch.arange(W.shape[1]), damp=0.0)
    expected = W.clone()
    expected[:, 4] = 0
    assert rel_close(restored, expected, 1e-9)  # keeping everything reproduces W (the dead column cannot matter)


def _random_pd(d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 3 * d, generator=generator, dtype=torch.float64)
    return 2 * A @ A.t() / (3 * d)


@pytest.mark.parametrize("solver", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_restoration_reproduces_slimgpt_heads(solver: str, dtype: torch.dtype) -> None:
    """SlimGPT's greedy head removal on a random PD H; restoring its removed set with the same damped H."""
    torch.manual_seed(1)
    W = torch.randn(16, 32, dtype=torch.float64)
    H = prepare_hessian(_random_pd(32, 2), W, percdamp=0.01)
    units = torch.arange(32).view(8, 4)
    state = make_solver(solver, W.to(dtype), H.to(dtype))
    removed = greedy_remove_units(state, units, 3)
    keep = torch.ones(32, dtype=torch.bool)
    keep[units[removed].flatten()] = False
    restored = restore_least_squares(W.to(dtype), H.to(dtype), keep, damp=0.0)
    assert rel_close(restored, state.weight, 1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("solver", ["fast", "reference"])
def test_restoration_reproduces_slimgpt_ffn_channels(solver: str) -> None:
    """SlimGPT's Dynamic Group Size channel removal (several rounds) versus one restoration."""
    torch.manual_seed(3)
    W = torch.randn(24, 48, dtype=torch.float64)
    H = prepare_hessian(_random_pd(48, 4), W, percdamp=0.01)
    state = make_solver(solver, W, H)
    removed = remove_channels(state, group_sizes(20, "halving", start=8, floor=2))
    keep = torch.ones(48, dtype=torch.bool)
    keep[removed] = False
    assert rel_close(restore_least_squares(W, H, keep, damp=0.0), state.weight, 1e-10)


def test_cli_prunes_with_fasp_and_the_output_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from slimgpt.cli import main

    out = tmp_path / "fasp"
    assert main(["prune", "tiny-mha", "--method", "fasp", "--ratio", "0.2", "--calib", "builtin", "--nsamples", "8",
                 "--seqlen", "128", "-o", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded(torch.arange(16).view(1, -1)).logits.isfinite().all()
    assert "(fasp)" in (out / "README.md").read_text()
    assert main(["eval", str(out), "--ppl", "builtin", "--seqlens", "128", "--max-windows", "2",
                 "--device", "cpu"]) == 0


def test_streaming_gives_the_in_memory_model(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_stream_matches_memory(tmp_path, tokenizer, _config(ratio=0.3), lambda r: r.kept_heads)
