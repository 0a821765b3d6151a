"""End-to-end invariants of the driver on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

import slimgpt
from conftest import FAMILIES, calibration, make_model, probe, rel_close
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.errors import ConfigError, NumericalError, UnsupportedModelError
from slimgpt.layerwise.capture import capture_layer_inputs, input_of
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import decoder_params, layer_geometry


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(ratio=0.2, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig(**values)  # type: ignore[arg-type]


def test_ratio_zero_changes_nothing() -> None:
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model(model, _config(ratio=0.0), calibration(), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert report.realised_ratio == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_compaction_equals_zero_masking(family: str) -> None:
    masked = make_model(family)
    report = prune_model(masked, _config(ratio=0.5), calibration(), compact=False, progress=False)
    x = probe()
    masked_logits = masked(x).logits
    adapter = get_adapter(masked.config)
    for layer, row in zip(adapter.decoder_layers(masked), report.layers, strict=True):
        adapter.shrink_layer(layer, torch.tensor(row.kept_heads), torch.tensor(row.kept_channels))
    compact_logits = masked(x).logits
    assert torch.allclose(masked_logits, compact_logits, atol=1e-5)
    assert decoder_params(masked, adapter) < report.decoder_params_before


def _kv_heads_in_cache(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    cache = model(x, use_cache=True).past_key_values
    return [layer.keys.shape[1] for layer in cache.layers]


# The query-heads policy only differs from kv-group on GQA models (MHA has one query head per KV head).
CASES = [(f, p) for f in FAMILIES for p in ("kv-group", "query-heads") if p == "kv-group" or f not in ("llama", "opt")]


@pytest.mark.parametrize(("family", "policy"), CASES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_prune_save_reload_identical(family: str, ratio: float, policy: str, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    dense_total = sum(p.numel() for p in model.parameters())
    report = prune_model(model, _config(ratio=ratio, gqa_policy=policy), calibration(), progress=False)
    x = probe()
    logits = model(x).logits
    out = save_pruned(model, tokenizer, report, tmp_path / "out")
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__.startswith("Slim")
    assert torch.allclose(reloaded(x).logits, logits, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == report.total_params_after < dense_total
    # The realised decoder ratio is within one attention unit of the target.
    dense = make_model(family)
    adapter = get_adapter(dense.config)
    geometry = layer_geometry(adapter, adapter.decoder_layers(dense)[0], policy)
    slack = geometry.params_per_attn_unit / report.decoder_params_before
    assert abs(report.realised_ratio - ratio) <= slack
    # KV cache shape follows the policy: kv-group shrinks it, query-heads keeps every KV head.
    kv = _kv_heads_in_cache(reloaded, x)
    assert kv == [row.kv_heads_kept for row in report.layers]
    if policy == "query-heads":
        assert kv == [row.kv_heads_total for row in report.layers]
    generated = reloaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (1, 9)


def test_load_pruned_and_report(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model("llama-gqa")
    report = prune_model(model, _config(ratio=0.3), calibration(), progress=False)
    save_pruned(model, tokenizer, report, tmp_path / "out")
    loaded, _ = slimgpt.load_pruned(tmp_path / "out", dtype="float32")
    assert torch.allclose(loaded(probe()).logits, model(probe()).logits, atol=1e-5)
    again = slimgpt.load_report(tmp_path / "out")
    assert again.decoder_params_after == report.decoder_params_after
    assert (tmp_path / "out" / "README.md").read_text().count("slimgpt") > 2


def test_report_has_errors_and_compensation_helps() -> None:
    model = make_model("llama")
    report = prune_model(model, _config(ratio=0.5), calibration(n=16), progress=False)
    for row in report.layers:
        if row.attn_error is not None:
            assert row.attn_error <= row.attn_error_uncompensated + 1e-6
        if row.ffn_error is not None:
            assert row.ffn_error <= row.ffn_error_uncompensated + 1e-6
    assert set(report.stage_seconds) >= {"calibration_forward", "hessians", "solve", "propagation"}
    assert report.peak_memory_bytes > 0


def test_fast_and_reference_solvers_prune_identically() -> None:
    results = []
    for solver in ("fast", "reference"):
        model = make_model("llama")
        report = prune_model(model, _config(ratio=0.4, solver=solver), calibration(), progress=False)
        results.append((report, model.state_dict()))
    (r1, s1), (r2, s2) = results
    assert [row.kept_heads for row in r1.layers] == [row.kept_heads for row in r2.layers]
    assert [row.kept_channels for row in r1.layers] == [row.kept_channels for row in r2.layers]
    for key in s1:
        assert (s1[key] - s2[key]).norm() <= 1e-4 * s1[key].norm() + 1e-7, key


def test_unknown_family_is_rejected() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        prune_model(model, _config(), calibration(), progress=False)


def test_bad_options_fail_before_work() -> None:
    with pytest.raises(ConfigError, match="ratio"):
        _config(ratio=1.0)
    with pytest.raises(ConfigError, match="ratio"):
        _config(ratio=-0.1)
    with pytest.raises(ConfigError, match="schedule"):
        _config(schedule="cubic")
    with pytest.raises(ConfigError, match="unknown pruning option"):
        PruneConfig.from_dict({"ratio": 0.2, "bogus": 1})
    assert PruneConfig.from_json(_config(ratio=0.3).to_json()) == _config(ratio=0.3)


def test_nan_weights_get_their_own_clear_error() -> None:
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match="non-finite weights"):
        prune_model(model, _config(ratio=0.5), calibration(), progress=False)


def test_resume_after_interruption_is_bit_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(ratio=0.4)
    reference = make_model("llama-gqa")
    prune_model(reference, config, calibration(), progress=False)

    crashed = make_model("llama-gqa")
    prune_model(crashed, config, calibration(), checkpoint_dir=tmp_path / "ckpt", stop_after_layer=0,
                progress=False)
    resumed = make_model("llama-gqa")  # a fresh process would reload the dense model
    report = prune_model(resumed, config, calibration(), checkpoint_dir=tmp_path / "ckpt", resume=True,
                         progress=False)
    assert len(report.layers) == 3
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    with pytest.raises(ConfigError, match="other options"):
        prune_model(make_model("llama-gqa"), _config(ratio=0.3), calibration(),
                    checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)


def test_bf16_model_keeps_dtype() -> None:
    model = make_model("llama").to(torch.bfloat16)
    prune_model(model, _config(ratio=0.3), calibration(), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def _post_norm_opt() -> torch.nn.Module:
    """OPT-350m's layout: LayerNorm after each residual add."""
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     ffn_dim=96, max_position_embeddings=128, word_embed_proj_dim=64,
                                     do_layer_norm_before=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family", [*FAMILIES, "opt-post-norm"])
def test_attention_is_residual_says_when_o_proj_ends_the_attention_half(family: str) -> None:
    model = _post_norm_opt() if family == "opt-post-norm" else make_model(family)
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[0]
    with torch.no_grad():
        h, kwargs_by_size = capture_layer_inputs(model, adapter, probe(), 2, torch.device("cpu"),
                                                 torch.device("cpu"))
        kw = kwargs_by_size[2]
        o_proj = adapter.attn_output(layer)
        inner = input_of(o_proj, lambda: adapter.attention_block(layer, h, kw))
        rebuilt = h + o_proj(inner)
        same = torch.allclose(rebuilt, adapter.attention_block(layer, h, kw), atol=1e-6)
    assert adapter.attention_is_residual(layer) == (family != "opt-post-norm")
    assert same == adapter.attention_is_residual(layer)


@pytest.mark.parametrize("method", ["slimgpt", "flap"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("family", ["llama", "llama-gqa", "opt", "opt-post-norm"])
def test_reused_attention_inputs_equal_rerunning_attention(family: str, ratio: float, method: str) -> None:
    """The driver's cheap path (o_proj's inputs kept from the first pass, propagation through the FFN half
    only) prunes as running the attention half in every pass does, up to float rounding."""
    build = _post_norm_opt if family == "opt-post-norm" else lambda: make_model(family)
    config = _config(ratio=ratio, method=method)
    fast, reference = build(), build()
    fast_report = prune_model(fast, config, calibration(), progress=False)
    reference_report = prune_model(reference, config, calibration(), progress=False, _rerun_attention=True)
    for ours, theirs in zip(fast_report.layers, reference_report.layers, strict=True):
        assert (ours.kept_heads, ours.kept_channels) == (theirs.kept_heads, theirs.kept_channels)
    assert any(row.heads_kept < row.heads_total or row.ffn_kept < row.ffn_total for row in fast_report.layers)
    fast_state, reference_state = fast.state_dict(), reference.state_dict()
    assert fast_state.keys() == reference_state.keys()
    for key, value in fast_state.items():  # relative to each tensor's scale: compensation amplifies rounding
        assert rel_close(value, reference_state[key], rel=1e-4), key
    with torch.no_grad():
        assert rel_close(fast(probe()).logits, reference(probe()).logits, rel=1e-5)
