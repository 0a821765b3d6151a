"""DISP-LLM (slimgpt.methods.disp_llm): seeded masks, exactness of the gather/scatter export, the target size,
save/reload, resuming, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_refuses_padded_export_and_stream, calibration, make_model, probe, rel_close
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError, UnsupportedModelError
from slimgpt.methods import get_method
from slimgpt.methods.disp_llm import LOSS_LOG, DispLLMMethod
from slimgpt.methods.disp_llm_parts import MaskHooks, block_cost, final_sets
from slimgpt.models.families import get_adapter
from slimgpt.models.slim import load_model

LLAMA_LIKE = ["llama", "llama-gqa", "mistral", "qwen2"]


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(method="disp-llm", ratio=0.3, nsamples=8, seqlen=32, batch_size=2)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def _prune(family: str, **kwargs: object) -> tuple[torch.nn.Module, DispLLMMethod, object]:
    config = kwargs.pop("config", None) or _config()
    model = make_model(family)
    method = DispLLMMethod(config, **kwargs)  # type: ignore[arg-type]
    report = prune_model(model, config, calibration(config.nsamples), method=method,  # type: ignore[union-attr]
                         progress=False)
    return model, method, report


def _masked(family: str, method: DispLLMMethod) -> torch.nn.Module:
    """The dense model with the method's final masks at its five insertion points per block."""
    dense = make_model(family)
    assert method.final is not None
    hooks = MaskHooks(dense, get_adapter(dense.config))
    hooks.masks = [m.float() for m in method.final.masks]
    return dense


def test_all_ones_masks_and_ratio_zero_change_nothing() -> None:
    model = make_model("llama")
    dense = copy.deepcopy(model)
    hooks = MaskHooks(model, get_adapter(model.config))
    costs = [block_cost(get_adapter(model.config), layer) for layer in model.model.layers]
    hooks.masks = [torch.ones(size) for c in costs for size in c.sizes]
    x = probe()
    assert torch.equal(model(x).logits, dense(x).logits)
    hooks.remove()
    report = prune_model(model, _config(ratio=0.0), calibration(), progress=False)
    assert torch.equal(model(x).logits, dense(x).logits)
    assert report.decoder_params_after == report.decoder_params_before
    assert model.config.model_type == "slimgpt_disp_llama"


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_export_equals_masked_model_hits_the_size_and_reloads(family: str, tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, method, report = _prune(family)
    target = round(report.decoder_params_before * 0.7)  # type: ignore[attr-defined]
    assert abs(report.decoder_params_after - target) <= report.schedule["granularity"] / 2  # type: ignore[attr-defined]
    x = probe()
    logits = model(x).logits
    assert rel_close(logits, _masked(family, method)(x).logits)
    out = save_pruned(model, tokenizer, report, tmp_path / "out")  # type: ignore[arg-type]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.model_type == f"slimgpt_disp_{make_model(family).config.model_type}"
    assert torch.equal(reloaded(x).logits, logits)
    loaded, _ = load_model(str(out))  # what `slimgpt eval` loads
    assert torch.equal(loaded(x).logits, logits)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after  # type: ignore[attr-defined]
    log = [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(e["loss"] > 0 for e in log)
    assert "(disp-llm)" in (out / "README.md").read_text()


def test_half_the_model_and_the_sets_are_independent_per_block() -> None:
    model, method, report = _prune("llama-gqa", config=_config(ratio=0.5))
    target = round(report.decoder_params_before * 0.5)  # type: ignore[attr-defined]
    assert abs(report.decoder_params_after - target) <= report.schedule["granularity"] / 2  # type: ignore[attr-defined]
    index = model.config.disp_index
    assert len(index) == 3 and all(len(sets) == 5 for sets in index)
    assert any(sets[0] != sets[1] for sets in index)  # a block reads other dims than it writes
    assert rel_close(model(probe()).logits, _masked("llama-gqa", method)(probe()).logits)


def test_masks_are_deterministic_with_a_seed() -> None:
    runs = [_prune("llama", config=_config(seed=seed))[1] for seed in (0, 0, 1)]
    masks = [torch.cat(m.final.masks) for m in runs if m.final is not None]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    hypernetwork = runs[0].hypernetwork
    assert hypernetwork is not None
    seeded = DispLLMMethod(_config(), final_mask="seeded")
    settings = seeded.settings(calibration())
    draws = [torch.cat(seeded.scores(hypernetwork, settings)) for _ in range(2)]
    argmax = torch.cat(runs[0].scores(hypernetwork, settings))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], argmax)


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    config = _config(nsamples=8)
    _, whole, _ = _prune("llama", config=config, save_every=2)
    checkpoint = tmp_path / "ckpt"
    stopped = DispLLMMethod(config, save_every=2, stop_after_step=3)
    model = make_model("llama")
    prune_model(model, config, calibration(8), method=stopped, checkpoint_dir=checkpoint, progress=False)
    assert model.config.model_type == "llama" and (checkpoint / "train.json").exists()
    resumed = DispLLMMethod(config, save_every=2)
    report = prune_model(model, config, calibration(8), method=resumed, checkpoint_dir=checkpoint, resume=True,
                         progress=False)
    assert whole.final is not None and resumed.final is not None
    assert all(torch.equal(a, b) for a, b in zip(whole.final.masks, resumed.final.masks, strict=True))
    assert resumed.log == whole.log and len(resumed.log) == 4 and report.schedule["steps"] == 4
    other = DispLLMMethod(_config(nsamples=8, seed=5), save_every=2)
    with pytest.raises(ConfigError, match="another run"):
        prune_model(make_model("llama"), _config(nsamples=8, seed=5), calibration(8), method=other,
                    checkpoint_dir=checkpoint, resume=True, progress=False)


def test_final_sets_keep_the_best_entries_and_one_per_set() -> None:
    model = make_model("llama")
    adapter = get_adapter(model.config)
    costs = [block_cost(adapter, layer) for layer in adapter.decoder_layers(model)]
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(size, generator=generator) for c in costs for size in c.sizes]
    scores[3] -= 100  # a set the scores would empty keeps its best entry
    target = round(sum(c.params(c.sizes) for c in costs) * 0.4)
    final = final_sets(scores, costs, target)
    assert abs(final.params - target) <= max(c.largest_entry for c in costs) / 2
    assert all(int(m.sum()) >= 1 for m in final.masks)
    assert int(final.masks[3].sum()) == 1 and bool(final.masks[3][scores[3].argmax()])
    kept = torch.cat([s[m] for s, m in zip(scores, final.masks, strict=True) if int(m.sum()) > 1])
    dropped = torch.cat([s[~m] for s, m in zip(scores, final.masks, strict=True)])
    assert float(kept.min()) >= float(dropped.max())


def test_refusals(tmp_path: Path, tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedModelError, match="LLaMA-like"):
        prune_model(make_model("opt"), _config(), calibration(), progress=False)
    assert "--method disp-llm" in get_method(_config()).cannot_stream()
    with pytest.raises(ConfigError, match="--round-to"):
        prune_model(make_model("llama"), _config(round_to=8), calibration(), progress=False)
    model, _, report = _prune("llama")
    out = save_pruned(model, tokenizer, report, tmp_path / "out")  # type: ignore[arg-type]
    assert_refuses_padded_export_and_stream(tmp_path, tokenizer, capsys, out, "disp-llm")
