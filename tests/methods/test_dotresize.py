"""DOTResize (slimgpt.methods.dotresize): ratio 0 is exact, the target size is hit with one FFN width and all
heads, the merge is the transport plan folded into down_proj, save/reload and streaming give the same
logits, runs are deterministic, and the CLI prunes and evaluates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, assert_stream_matches_memory, calibration, make_model, probe, rel_close
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError
from slimgpt.methods import Decision, PruneJob, get_method
from slimgpt.methods.dotresize import DOTResizeMethod
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import model_geometry
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.transport import activation_cost, sinkhorn_log


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method="dotresize", ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def test_dotresize_is_registered_with_its_texts() -> None:
    method = get_method(_config())
    assert isinstance(method, DOTResizeMethod) and method.needs_hessian and method.stock_config
    assert method.cannot_stream() == ""
    assert "activation norm" in method.card_options(_config().to_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_changes_nothing(family: str) -> None:
    model = make_model(family)
    x = probe()
    dense = model(x).logits
    report = prune_model(model, _config(ratio=0.0), calibration(), progress=False)
    assert all(row.heads_kept == row.heads_total and row.ffn_kept == row.ffn_total for row in report.layers)
    assert torch.equal(model(x).logits, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_target_size_one_width_and_save_reload_identical(family: str, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    ratio = 0.2 if family == "opt" else 0.4  # OPT's FFN (1.5 d wide here) holds less of its layer
    model = make_model(family)
    dense = copy.deepcopy(model)
    per_channel = model_geometry(model, get_adapter(model.config), "kv-group")[0].params_per_channel
    report = prune_model(model, _config(ratio=ratio), calibration(), progress=False)
    step = len(report.layers) * per_channel  # one channel off every layer: the finest uniform step
    assert abs(report.realised_ratio - ratio) * report.decoder_params_before <= step / 2
    width = report.layers[0].ffn_kept
    assert width < report.layers[0].ffn_total
    assert all(row.ffn_kept == width and row.heads_kept == row.heads_total for row in report.layers)
    assert "fraction of decoder-layer parameters" in report.ratio_convention
    assert f"{width} of" in report.ratio_convention
    x = probe()
    logits = model(x).logits
    assert not rel_close(dense(x).logits, logits, 1e-3)  # something was really merged away
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == dense.config.model_type  # uniform width, all heads: a stock config
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(dense)
    assert rel_close(reloaded(x).logits, logits, 1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after
    assert "(dotresize)" in (out / "README.md").read_text()


def test_a_ratio_the_ffn_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match="from the FFN alone"):
        prune_model(make_model("opt"), _config(ratio=0.5), calibration(), progress=False)


def _job(seed: int = 0, n: int = 24, d: int = 10, removed: int = 9) -> PruneJob:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(200, n, generator=generator) * torch.linspace(0.1, 2.0, n)
    stats = InputStatistics(n, "cpu")
    stats.add(X)
    return PruneJob(torch.randn(d, n, generator=generator), stats, torch.arange(n).view(-1, 1), removed)


def test_the_decision_keeps_the_largest_activations_and_folds_the_plan_into_down_proj() -> None:
    job = _job()
    decision = DOTResizeMethod(_config()).prune_ffn(job)
    assert job.stats is not None
    norms = job.stats.diagonal.sqrt()
    assert sorted(decision.removed_units) == torch.argsort(norms)[:9].sort().values.tolist()
    keep = torch.ones(24, dtype=torch.bool)
    keep[decision.removed_units] = False
    P = sinkhorn_log(activation_cost(job.stats.hessian, keep.nonzero().flatten()), epsilon=DOTResizeMethod.epsilon,
                     tol=1e-9).plan
    assert float((P.sum(1) - 1 / 24).abs().max()) <= 1e-9 / 24
    assert float((P.sum(0) - 1 / 15).abs().sum()) <= 1e-8  # marginals: every target takes 24/15 neurons' mass
    expected = torch.zeros_like(job.weight)
    expected[:, keep] = (job.weight.double() @ (24 * P)).float()
    assert rel_close(decision.weight, expected, 1e-4)  # the method stops at a marginal error of 1e-6
    assert float(decision.weight[:, ~keep].abs().max()) == 0.0
    assert decision.info["sinkhorn_marginal_error"] <= 1e-6


def test_runs_are_deterministic() -> None:
    first, second = make_model("llama-gqa"), make_model("llama-gqa")
    a = prune_model(first, _config(ratio=0.3), calibration(), progress=False)
    b = prune_model(second, _config(ratio=0.3), calibration(), progress=False)
    assert [r.kept_channels for r in a.layers] == [r.kept_channels for r in b.layers]
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


class _Recorder(DOTResizeMethod):
    """Keeps the decisions, to compare the driver's weights with the method's."""

    decisions: list[Decision]

    def prune_ffn(self, job: PruneJob) -> Decision:
        decision = super().prune_ffn(job)
        self.__dict__.setdefault("decisions", []).append(decision)
        return decision


def test_the_driver_writes_the_merged_down_proj() -> None:
    model = make_model("llama")
    method = _Recorder(_config(ratio=0.3))
    report = prune_model(model, method.config, calibration(), method=method, progress=False)
    adapter = get_adapter(model.config)
    for layer, row, decision in zip(adapter.decoder_layers(model), report.layers, method.decisions, strict=True):
        kept = torch.tensor(row.kept_channels)
        assert torch.equal(adapter.mlp_output(layer).weight.data, decision.weight[:, kept])


def test_streaming_gives_the_in_memory_model(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_stream_matches_memory(tmp_path, tokenizer, _config(ratio=0.3), lambda r: r.kept_channels)


def test_cli_prunes_with_dotresize_and_the_output_evaluates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from slimgpt.cli import main

    out = tmp_path / "dot"
    assert main(["prune", "tiny-mha", "--method", "dotresize", "--ratio", "0.5", "--calib", "builtin",
                 "--nsamples", "4", "--seqlen", "64", "-o", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded(torch.arange(16).view(1, -1)).logits.isfinite().all()
    assert "(dotresize)" in (out / "README.md").read_text()
    assert main(["eval", str(out), "--ppl", "builtin", "--seqlens", "64", "--max-windows", "2",
                 "--device", "cpu"]) == 0
