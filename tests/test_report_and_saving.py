"""slimgpt.report and slimgpt.saving: the report round-trips to JSON; a saved model reloads with its report and card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import calibration, make_model, probe
from slimgpt import PruneConfig, load_report, prune_model, save_pruned
from slimgpt.errors import OutputExistsError
from slimgpt.report import PruneReport
from slimgpt.saving import check_checkpoint, model_card


@pytest.fixture(scope="module")
def pruned() -> tuple[torch.nn.Module, PruneReport]:
    model = make_model("llama-gqa")
    report = prune_model(model, PruneConfig(ratio=0.3, nsamples=8, seqlen=32), calibration(), progress=False)
    return model, report


def test_the_report_round_trips_through_json(pruned: tuple[torch.nn.Module, PruneReport]) -> None:
    _, report = pruned
    again = PruneReport.from_dict(json.loads(report.to_json(with_indices=True)))
    assert again == report
    data = report.to_dict()
    assert data["realised_ratio"] == pytest.approx(report.realised_ratio)
    assert "kept_heads" not in data["layers"][0]  # indices only with_indices
    assert "kept_heads" in report.to_dict(with_indices=True)["layers"][0]


def test_the_markdown_names_every_layer(pruned: tuple[torch.nn.Module, PruneReport]) -> None:
    _, report = pruned
    text = report.to_markdown()
    for row in report.layers:
        assert f"| {row.layer} | {row.ratio:.3f} |" in text


def test_save_then_load_gives_the_same_logits_report_and_card(tmp_path: Path, tokenizer: object,
                                                              pruned: tuple[torch.nn.Module, PruneReport]) -> None:
    model, report = pruned
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = probe()
    expected, got = model(ids).logits, reloaded(ids).logits
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert load_report(out) == PruneReport.from_dict(json.loads(report.to_json(with_indices=True)))
    card = (out / "README.md").read_text()
    assert card == model_card(report)
    assert "OBS-compensated" in card and "head score gcd" in card  # the method's own texts
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_pruned(model, tokenizer, report, out)


def test_a_leftover_checkpoint_needs_resume(tmp_path: Path) -> None:
    output = tmp_path / "out"
    (tmp_path / "out.checkpoint").mkdir()
    with pytest.raises(OutputExistsError, match="--resume"):
        check_checkpoint(output, None, resume=False)
    assert check_checkpoint(output, None, resume=True) == tmp_path / "out.checkpoint"
