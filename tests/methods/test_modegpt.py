"""MoDeGPT (slimgpt.methods.modegpt): invariants of its closed forms, the target size, save/reload, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_refuses_padded_export_and_stream, calibration, make_model, probe, rel_close
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError, UnsupportedModelError
from slimgpt.methods import get_method
from slimgpt.methods.modegpt_parts import layer_cost
from slimgpt.models.families import get_adapter
from slimgpt.models.slim import load_model
from slimgpt.solver.modegpt import allocate_sparsity, low_rank_vo, ridge_leverage
from slimgpt.solver.restore import restore_least_squares

LLAMA_LIKE = ["llama", "llama-gqa", "mistral", "qwen2"]


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method="modegpt", ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_ratio_zero_changes_nothing(family: str) -> None:
    model = make_model(family)
    dense = copy.deepcopy(model)
    report = prune_model(model, _config(ratio=0.0), calibration(), progress=False)
    x = probe()
    assert torch.equal(model(x).logits, dense(x).logits)
    assert report.decoder_params_after == report.decoder_params_before
    assert model.config.model_type == f"slimgpt_modegpt_{dense.config.model_type}"


@pytest.mark.parametrize("family", LLAMA_LIKE)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_target_size_and_exact_save_reload(family: str, ratio: float, tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    adapter = get_adapter(model.config)
    channel = layer_cost(adapter, adapter.decoder_layers(model)[0]).per_channel
    report = prune_model(model, _config(ratio=ratio), calibration(), progress=False)
    target = round(report.decoder_params_before * (1 - ratio))
    assert abs(report.decoder_params_after - target) <= channel / 2  # within half an FFN channel
    x = probe()
    logits = model(x).logits
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.qk_dims == report.schedule["qk_dims"]
    assert torch.equal(reloaded(x).logits, logits)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
    loaded, _ = load_model(str(out))  # what `slimgpt eval` loads
    assert torch.equal(loaded(x).logits, logits)
    card = (out / "README.md").read_text()
    assert "(modegpt)" in card and report.ratio_convention in card and "MoDeGPT quotes" in card


def test_value_output_at_full_rank_is_exact() -> None:
    """W_V' W_O' = W_V W_O at rank head_dim, with and without a bias column (any ridge)."""
    generator = torch.Generator().manual_seed(0)
    d, hd, n = 24, 8, 25
    X = torch.randn(200, n, generator=generator, dtype=torch.float64)
    X[:, -1] = 1  # the constant-one input of a bias
    C = X.T @ X
    Wv = torch.randn(hd, n, generator=generator, dtype=torch.float64)
    Wo = [torch.randn(d, hd, generator=generator, dtype=torch.float64) for _ in range(3)]
    for ridge in (0.0, 1e-2):
        v_new, o_new = low_rank_vo(Wv, Wo, C, hd, ridge)
        for o, o2 in zip(Wo, o_new, strict=True):
            assert rel_close(o2 @ v_new, o @ Wv, rel=1e-9)


def test_value_output_low_rank_is_the_weighted_svd_optimum() -> None:
    """At rank k the error ||C^1/2 (W_V W_O - W_V' W_O')|| is the tail of C^1/2 W_V W_O's singular values."""
    generator = torch.Generator().manual_seed(1)
    d, hd, n, k = 16, 8, 12, 3
    X = torch.randn(300, n, generator=generator, dtype=torch.float64) @ torch.randn(n, n, generator=generator,
                                                                                 dtype=torch.float64)
    C = X.T @ X
    Wv = torch.randn(hd, n, generator=generator, dtype=torch.float64)
    Wo = [torch.randn(d, hd, generator=generator, dtype=torch.float64) for _ in range(2)]
    v_new, o_new = low_rank_vo(Wv, Wo, C, k, ridge=0.0)
    full = torch.cat([Wv.T @ o.T for o in Wo], dim=1)  # row convention: x W_V W_O
    approx = torch.cat([v_new.T @ o.T for o in o_new], dim=1)
    error = torch.linalg.matrix_norm(X @ (full - approx))
    tail = torch.linalg.svdvals(X @ full)[k:].square().sum().sqrt()
    assert abs(float(error - tail)) <= 1e-8 * float(tail)


def test_ffn_refit_equals_least_squares() -> None:
    """restore_least_squares is the least-squares fit of W X from the kept inputs (damp 0), ridge with damp."""
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(500, 20, generator=generator, dtype=torch.float64)  # tokens x inputs
    W = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    keep = torch.tensor([0, 3, 4, 9, 10, 15, 19])
    H = 2 * X.T @ X / len(X)
    fitted = restore_least_squares(W, H, keep, damp=0.0)
    reference = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    assert rel_close(fitted[:, keep], reference, rel=1e-9)
    assert float(fitted[:, [i for i in range(20) if i not in keep]].abs().max()) == 0
    lam = 0.05 * float(H.diagonal().mean())
    ridge = torch.linalg.solve(H[keep][:, keep] + lam * torch.eye(len(keep), dtype=torch.float64),
                               (W @ H[:, keep]).T).T
    assert rel_close(restore_least_squares(W, H, keep, damp=0.05)[:, keep], ridge, rel=1e-9)


def test_the_method_refits_down_proj_and_beats_dropping() -> None:
    model = make_model("llama")
    report = prune_model(model, _config(ratio=0.3), calibration(), progress=False)
    for row in report.layers:
        assert row.ffn_error is not None and row.ffn_error_uncompensated is not None
        assert row.ffn_error < row.ffn_error_uncompensated


def test_ridge_leverage_and_allocation() -> None:
    C = torch.diag(torch.tensor([4.0, 1.0, 0.0, 9.0]))
    scores = ridge_leverage(C, 0.1)
    assert scores.argsort(descending=True).tolist() == [3, 0, 1, 2] and float(scores[2]) == 0
    phi = allocate_sparsity([0.5, 0.01, 0.3, 0.02], 0.5, smoothing=0.01, cap=0.8)
    assert max(phi) <= 0.8 + 1e-12 and abs(sum(phi) / 4 - 0.5) < 1e-9
    assert phi[1] == pytest.approx(0.8) and phi[0] < phi[2] < phi[3]
    assert allocate_sparsity([0.2, 0.1], 0.0, smoothing=0.15) == [0.0, 0.0]


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = make_model("llama-gqa")
    prune_model(whole, _config(), calibration(), progress=False)
    model = make_model("llama-gqa")
    prune_model(model, _config(), calibration(), progress=False, checkpoint_dir=tmp_path / "ck", stop_after_layer=0)
    resumed = make_model("llama-gqa")
    report = prune_model(resumed, _config(), calibration(), progress=False, checkpoint_dir=tmp_path / "ck",
                         resume=True)
    assert len(report.layers) == 3
    x = probe()
    assert torch.equal(resumed(x).logits, whole(x).logits)


def test_refusals(tmp_path: Path, tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedModelError, match="LLaMA-like"):
        prune_model(make_model("opt"), _config(), calibration(), progress=False)
    assert "--method modegpt" in get_method(_config()).cannot_stream()
    with pytest.raises(ConfigError, match=r"--ratio 0\.9"):
        prune_model(make_model("llama"), _config(ratio=0.9), calibration(), progress=False)
    model = make_model("llama")
    report = prune_model(model, _config(), calibration(), progress=False)
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    assert_refuses_padded_export_and_stream(tmp_path, tokenizer, capsys, out, "modegpt")
