"""Evaluation without lm-eval: perplexity, speed, reports, compare, plots and the compare CLI.

Every model is a tiny random LLaMA built in-process (no download, CPU, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimgpt.evaluation.ppl as ppl_module
from slimgpt.cli import add_subcommands as register
from slimgpt.errors import ConfigError, DataError, SlimGPTError
from slimgpt.evaluation import (
    EvalReport,
    LayerWidths,
    PerplexityResult,
    SpeedResult,
    TaskScore,
    compare,
    count_parameters,
    evaluate_perplexity,
    layer_widths,
    measure_speed,
    perplexity,
    plot_kept_ratio,
    plot_layer_error,
    plot_ppl_vs_ratio,
    report_plots,
    weight_bytes,
    window_protocol,
)
from slimgpt.evaluation.harness import summarise
from slimgpt.evaluation.ppl import window_nll_sum

VOCAB = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROTOCOL_128 = "128-token windows (LLM-Pruner/SlimGPT protocol)"


def tiny_llama(seed: int = 0, max_positions: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=max_positions, eos_token_id=1, bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def random_windows(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- perplexity


def test_perplexity_equals_hand_computed_mean_nll(model: LlamaForCausalLM) -> None:
    windows = random_windows(5, 17)  # [5, 17]: 5 windows, 16 predicted tokens each
    nll = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].double()  # [16, vocab]
            log_probs = torch.log_softmax(logits, dim=-1)
            nll.append(-log_probs.gather(1, window[1:, None]).squeeze(1))  # [16]
    expected = math.exp(float(torch.cat(nll).mean()))

    for batch_size in (1, 2, 5):  # 2 leaves a short last batch
        got = perplexity(model, windows, batch_size=batch_size, device="cpu", progress=False)
        assert got == pytest.approx(expected, rel=1e-5)


def test_loss_chunking_does_not_change_the_sum() -> None:
    logits = torch.randn(20, VOCAB, dtype=torch.bfloat16)
    window = torch.randint(0, VOCAB, (21,))
    whole = window_nll_sum(logits, window, chunk=1000)
    assert window_nll_sum(logits, window, chunk=3) == pytest.approx(whole, rel=1e-9)
    expected = float(torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="sum"))
    assert whole == pytest.approx(expected, rel=1e-6)


def test_perplexity_rejects_bad_windows(model: LlamaForCausalLM) -> None:
    with pytest.raises(DataError):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, random_windows(2, 8), batch_size=0, progress=False)


def test_window_protocol_names_the_protocol_and_clips_to_the_model_context() -> None:
    assert window_protocol(128, 2048) == (128, PROTOCOL_128)
    assert window_protocol(2048, None) == (2048, "2048-token windows (SliceGPT protocol)")
    assert window_protocol(64, 512) == (64, "64-token windows")
    used, protocol = window_protocol(2048, 512)
    assert used == 512
    assert protocol == "512-token windows (model context; 2048 requested, SliceGPT protocol)"


def test_evaluate_perplexity_uses_data_windows_at_the_clipped_length(
    model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def eval_windows(tokenizer: object, source: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
        calls.append((source, seqlen, max_windows))
        return random_windows(3, seqlen)

    # slimgpt.data is another module's job; stand in for it so this test checks only the wiring.
    monkeypatch.setattr(ppl_module, "eval_windows", eval_windows)
    result = evaluate_perplexity(model, tokenizer=None, dataset="builtin", seqlen=2048, max_windows=3)
    assert calls == [("builtin", 64, 3)]  # the model has a 64-token context
    assert result.seqlen == 64 and result.n_windows == 3 and result.n_tokens == 3 * 63
    assert "model context; 2048 requested" in result.protocol
    assert result.value == pytest.approx(perplexity(model, random_windows(3, 64), progress=False), rel=1e-6)


# ------------------------------------------------------------------------------------------------ speed


def test_measure_speed_counts_tokens_and_sizes(model: LlamaForCausalLM) -> None:
    result = measure_speed(model, prompt_tokens=8, gen_tokens=6, runs=2, warmup=1, device="cpu",
                           progress=False)
    assert result.generated_tokens == 6  # min_new_tokens: never stops at EOS
    assert (result.prompt_tokens, result.gen_tokens, result.runs, result.warmup) == (8, 6, 2, 1)
    for value in (result.prefill_tokens_per_s, result.decode_tokens_per_s, result.generate_seconds):
        assert value > 0 and math.isfinite(value)
    assert result.n_parameters == sum(p.numel() for p in model.parameters()) == count_parameters(model)
    assert result.weight_bytes == 4 * result.n_parameters == weight_bytes(model)
    assert result.peak_memory_bytes > 0 and "ru_maxrss" in result.peak_memory_note
    assert result.device == "cpu" and result.dtype == "float32"
    assert SpeedResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_measure_speed_rejects_too_few_tokens(model: LlamaForCausalLM) -> None:
    with pytest.raises(ConfigError):
        measure_speed(model, gen_tokens=1, progress=False)


# ------------------------------------------------------------------------------------ report and compare


def make_report(name: str, n_parameters: int, ppl: float, with_speed: bool = True, method: str | None = None,
                acc_shift: float = 0.0) -> EvalReport:
    scores = [
        TaskScore("boolq", 0.6 + acc_shift, None, 0.01, None, 0, 100),
        TaskScore("piqa", 0.7 + acc_shift, 0.72 + acc_shift, 0.01, 0.01, 0, 100),
        TaskScore("mmlu", 0.3 + acc_shift, None, 0.01, None, 5, 400),
    ]
    speed = SpeedResult(
        device="cpu", dtype="float32", batch_size=1, prompt_tokens=128, gen_tokens=512, runs=3, warmup=1,
        prefill_tokens_per_s=1000.0, prefill_tokens_per_s_std=10.0, decode_tokens_per_s=50.0,
        decode_tokens_per_s_std=1.0, generate_seconds=10.0 * n_parameters / 1e6, generate_seconds_std=0.1,
        generated_tokens=512, n_parameters=n_parameters, weight_bytes=2 * n_parameters,
        peak_memory_bytes=3 * n_parameters, peak_memory_note="test",
    )
    return EvalReport(
        model=f"/models/{name}",
        n_parameters=n_parameters,
        weight_bytes=2 * n_parameters,
        dtype="bfloat16",
        device="cpu",
        perplexities=(
            PerplexityResult(ppl, "wikitext2", PROTOCOL_128, 128, 10, 1270),
            PerplexityResult(ppl / 2, "wikitext2", "2048-token windows (SliceGPT protocol)", 2048, 2, 4094),
        ),
        zero_shot=summarise(scores, source="lm-eval stock tasks", lm_eval_version="0.4.13"),
        speed=speed if with_speed else None,
        method=method,
        pruning_ratio=None,
        layers=(LayerWidths(0, 8, 8, 688, 688), LayerWidths(1, 4, 8, 300, 688)),
        versions={"slimgpt": "0.1.0", "torch": "2.13"},
    )


def test_average_is_named_and_leaves_out_mmlu() -> None:
    zero_shot = make_report("dense", 1_000_000, 12.6).zero_shot
    assert zero_shot is not None
    assert zero_shot.average_tasks == ("boolq", "piqa")
    assert zero_shot.average == pytest.approx((0.6 + 0.72) / 2)  # boolq has no acc_norm: acc counts
    assert zero_shot.average_acc == pytest.approx((0.6 + 0.7) / 2)
    assert zero_shot.average_convention == "mean of acc_norm where the task reports it, else acc"


def test_report_json_round_trip(tmp_path: Path) -> None:
    report = make_report("dense", 6_700_000, 12.63, method="slimgpt")
    assert EvalReport.from_json(report.to_json()) == report
    path = report.save(tmp_path / "sub" / "dense.json")
    assert EvalReport.load(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["dense.json"]  # no temporary file left behind


def test_report_load_errors_are_one_line_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such report"):
        EvalReport.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="not a slimgpt evaluation report"):
        EvalReport.load(tmp_path / "other.json")


def test_markdown_report_shows_protocols_and_both_accuracies() -> None:
    text = make_report("dense", 6_700_000, 12.63).to_markdown()
    assert PROTOCOL_128 in text
    assert "2048-token windows (SliceGPT protocol)" in text
    assert "| boolq | 0 | 60.00 | – |" in text  # acc_norm missing, not zero
    assert "mean of acc_norm where the task reports it, else acc" in text
    assert "ru_maxrss" not in text and "peak memory: test" in text


def test_compare_puts_every_model_side_by_side() -> None:
    reports = [
        make_report("dense", 6_700_000, 12.63),
        make_report("slim-20", 5_400_000, 16.68, method="slimgpt", acc_shift=-0.05),
        make_report("slim-50", 3_400_000, 38.83, with_speed=False, method="slimgpt", acc_shift=-0.1),
    ]
    table = compare(reports)
    header = table.splitlines()[0]
    for index, name in enumerate(("dense", "slim-20", "slim-50")):
        assert f"{name} [{index + 1}]" in header
        assert f"[{index + 1}] /models/{name}" in table
    assert f"| PPL wikitext2, {PROTOCOL_128} | 12.63 | 16.68 | 38.83 |" in table
    assert "(51%)" in table  # parameters relative to the first (dense) model
    speed_row = next(line for line in table.splitlines() if line.startswith("| decode"))
    assert speed_row.endswith("| – |")  # the third model has no speed measurement
    assert len({len(line.split("|")) for line in table.splitlines() if line.startswith("|")}) == 1


# ------------------------------------------------------------------------------------------------ plots


def assert_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png_files(tmp_path: Path) -> None:
    layers = [{"layer": i, "heads_kept": 8 - i // 4, "heads_total": 8, "ffn_kept": 688 - 40 * i // 3,
               "ffn_total": 688} for i in range(12)]
    assert_png(plot_kept_ratio(layers, tmp_path / "kept.png"))
    errors = {"SlimGPT": [0.01 * 2**i for i in range(12)], "magnitude": [0.05 * 2**i for i in range(12)]}
    assert_png(plot_layer_error(errors, tmp_path / "error.png"))
    curves = {"slimgpt": [(0.0, 12.6), (0.2, 16.7), (0.5, 38.8)], "llm-pruner": [(0.0, 12.6), (0.5, 40.6)]}
    assert_png(plot_ppl_vs_ratio(curves, tmp_path / "nested" / "ppl.png", dataset="wikitext2"))


def test_report_plots_draw_what_the_reports_support(tmp_path: Path) -> None:
    reports = [make_report("dense", 6_700_000, 12.63), make_report("slim", 3_400_000, 38.8, method="slimgpt")]
    written = report_plots(reports, tmp_path)
    names = sorted(path.name for path in written)
    # both reports carry a pruned layer layout; one PPL plot per window length
    assert names == ["kept_ratio_1.png", "kept_ratio_2.png", "ppl_vs_ratio_wikitext2_128.png",
                     "ppl_vs_ratio_wikitext2_2048.png"]
    for path in written:
        assert_png(path)


def test_plots_without_matplotlib_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(SlimGPTError, match=r"pip install slimgpt\[plot\]"):
        plot_layer_error({"a": [1.0, 2.0]}, tmp_path / "x.png")


def test_layer_widths_of_a_dense_and_a_shrunk_model(model: LlamaForCausalLM) -> None:
    assert layer_widths(model) == (LayerWidths(0, 4, 4, 128, 128), LayerWidths(1, 4, 4, 128, 128))
    from slimgpt.models.families import get_adapter

    shrunk = tiny_llama()
    adapter = get_adapter(shrunk.config)
    adapter.shrink_layer(adapter.decoder_layers(shrunk)[1], torch.tensor([0, 2]), torch.arange(50))
    assert layer_widths(shrunk) == (LayerWidths(0, 4, 4, 128, 128), LayerWidths(1, 2, 4, 50, 128))


# -------------------------------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slimgpt")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_compare_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for name, params, ppl in (("dense", 6_700_000, 12.63), ("slim", 3_400_000, 38.8)):
        paths.append(str(make_report(name, params, ppl, method="slimgpt").save(tmp_path / f"{name}.json")))
    out = tmp_path / "report.md"
    args = parse(["compare", *paths, "--out", str(out), "--plots", str(tmp_path / "plots")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "dense [1]" in printed and "slim [2]" in printed
    assert out.read_text() == printed.rstrip("\n")
    assert any(path.name.startswith("ppl_vs_ratio") for path in (tmp_path / "plots").iterdir())


def test_cli_errors_are_slimgpt_errors(tmp_path: Path) -> None:
    args = parse(["compare", str(tmp_path / "missing.json")])
    with pytest.raises(DataError):
        args.func(args)
    args = parse(["eval", "tiny-mha"])
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        args.func(args)
    with pytest.raises(SystemExit):  # argparse rejects a window shorter than 2 tokens itself
        parse(["eval", "tiny-mha", "--ppl", "builtin", "--seqlens", "1"])
