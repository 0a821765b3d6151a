"""``--spread`` (dynamic-slicing) and ``--eps`` (modegpt): flag -> PruneConfig -> method; misplaced values refused."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from conftest import calibration, make_model
from slimgpt import PruneConfig, prune_model
from slimgpt.cli import prune as cli_prune
from slimgpt.errors import ConfigError


def _config(*flags: str) -> PruneConfig:
    parser = argparse.ArgumentParser()
    cli_prune.add_prune_options(parser)
    args = parser.parse_args(["--nsamples", "8", "--seqlen", "32", "--batch-size", "4", *flags])
    return cli_prune.config_from(args)


def test_spread_flag_sets_dynamic_slicings_widths() -> None:
    flat = _config("--method", "dynamic-slicing", "--ratio", "0.3", "--spread", "0")
    steep = replace(flat, spread=1.0)
    assert flat.spread == 0.0 and PruneConfig.from_dict(flat.to_dict()) == flat
    assert _config("--method", "dynamic-slicing").spread is None  # the method's own default
    reports = {c.spread: prune_model(make_model("llama"), c, calibration(), progress=False) for c in (flat, steep)}
    widths = {spread: report.schedule["slice_dims"][:-1] for spread, report in reports.items()}
    assert {report.schedule["spread"] for report in reports.values()} == {0.0, 1.0}
    assert len(set(widths[0.0])) == 1 and len(set(widths[1.0])) > 1  # zero spread is SliceGPT's one width


def test_eps_flag_sets_modegpts_budget_smoothing() -> None:
    sharp = _config("--method", "modegpt", "--ratio", "0.3", "--eps", "0.001")
    smooth = replace(sharp, eps=100.0)
    assert sharp.eps == 0.001 and _config("--method", "modegpt").eps is None
    reports = {c.eps: prune_model(make_model("llama"), c, calibration(), progress=False) for c in (sharp, smooth)}
    assert "smoothing 0.001" in reports[0.001].method_options and "smoothing 100.0" in reports[100.0].method_options
    assert {r.schedule["smoothing"] for r in reports.values()} == {0.001, 100.0}
    spans = {eps: max(r.schedule["ratios"]) - min(r.schedule["ratios"]) for eps, r in reports.items()}
    assert spans[100.0] < 0.01 < spans[0.001]  # a large eps spreads the budget evenly, a small one does not


@pytest.mark.parametrize(("flags", "message"), [
    (("--method", "slimgpt", "--spread", "0.5"), "--spread is dynamic-slicing's option"),
    (("--method", "dynamic-slicing", "--spread", "1.5"), r"--spread 1\.5 is outside \[0, 1\]"),
    (("--method", "flap", "--eps", "0.1"), "--eps is modegpt's option"),
    (("--method", "modegpt", "--eps", "0"), r"--eps 0\.0 must be > 0"),
])
def test_misplaced_or_out_of_range_values_are_refused(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(*flags)
