"""Streaming pruning (slimgpt.streaming): same output as the in-memory path, one layer in memory at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import slimgpt
from conftest import TEXT, calibration, make_model, probe
from slimgpt import PruneConfig, prune_model, save_pruned
from slimgpt.cli import main as cli_main
from slimgpt.errors import ConfigError, SlimGPTError
from slimgpt.layerwise.run import LayerHooks
from slimgpt.streaming import INDEX_NAME, stream_prune


def _config(**overrides: object) -> PruneConfig:
    values: dict[str, object] = dict(ratio=0.4, nsamples=8, seqlen=32, batch_size=4)
    values.update(overrides)
    return PruneConfig.from_dict(values)


def _dense_dir(family: str, directory: Path, tokenizer: Any, shard: bool = True) -> Path:
    """The tiny dense model saved like a Hub checkpoint; sharded into many files unless ``shard`` is False."""
    model: Any = make_model(family)
    if shard:
        model.save_pretrained(directory, max_shard_size="50KB")
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _in_memory(dense: Path, config: PruneConfig, output: Path,
               tokenizer: object) -> tuple[nn.Module, slimgpt.PruneReport]:
    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    report = prune_model(model, config, calibration(), progress=False)
    save_pruned(model, tokenizer, report, output)
    return model, report


class Spy(LayerHooks):
    """Sees every layer while it is materialised; checks that no other layer is at the same time."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.seen: dict[int, nn.Module] = {}
        self.before_calls: list[int] = []
        self.most_resident = 0

    def before(self, index: int, layer: nn.Module) -> None:
        self.before_calls.append(index)
        self.seen[index] = layer
        assert not any(p.is_meta for p in layer.parameters()), "the layer must be loaded before it is pruned"
        resident = sum(p.numel() for seen in self.seen.values() for p in seen.parameters() if not p.is_meta)
        self.most_resident = max(self.most_resident, resident)

    def after(self, index: int, layer: nn.Module) -> None:
        if self.fail_after is not None and index >= self.fail_after:
            raise RuntimeError("simulated crash")


# llama (MHA, untied), llama-gqa (GQA), mistral and qwen2 (their own rotary modules, q/k/v biases for
# qwen2), opt (biases everywhere, tied lm_head, one unsharded file).
CASES = [("llama", True), ("llama-gqa", True), ("mistral", True), ("qwen2", True), ("opt", False)]


@pytest.mark.parametrize(("family", "shard"), CASES)
def test_stream_equals_in_memory(family: str, shard: bool, tmp_path: Path, tokenizer: object) -> None:
    dense = _dense_dir(family, tmp_path / "dense", tokenizer, shard)
    config = _config()
    model, report = _in_memory(dense, config, tmp_path / "memory", tokenizer)
    result = stream_prune(dense, config, tmp_path / "stream", calibration(), progress=False)

    out = result.output
    n_layers = len(report.layers)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"model-{i:05d}-of-{n_layers + 1:05d}.safetensors" for i in range(1, n_layers + 2)]
    assert not list(out.glob("*.bin")) and (out / "tokenizer.json").exists() and (out / "README.md").exists()
    streamed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(streamed).__name__.startswith("Slim")
    x = probe()
    assert torch.allclose(streamed(x).logits, model(x).logits, atol=1e-5)
    # Not just close: the very same tensors, config and parameter counts as save_pruned's output.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == memory_config
    for name in ("decoder_params_before", "decoder_params_after", "total_params_before", "total_params_after"):
        assert getattr(result.report, name) == getattr(report, name), name
    assert [r.kept_heads for r in result.report.layers] == [r.kept_heads for r in report.layers]
    index = json.loads((out / INDEX_NAME).read_text())
    files = index["weight_map"]
    assert set(files) == set(theirs) - ({"lm_head.weight"} if family == "opt" else set())  # OPT ties lm_head
    assert index["metadata"]["total_size"] == sum(ours[k].numel() * ours[k].element_size() for k in files)


def test_stream_holds_one_layer_at_a_time(tmp_path: Path, tokenizer: object) -> None:
    dense = _dense_dir("llama-gqa", tmp_path / "dense", tokenizer)
    spy = Spy()
    result = stream_prune(dense, _config(), tmp_path / "stream", calibration(), progress=False, layer_hooks=spy)
    stats = result.stats
    dense_model: Any = make_model("llama-gqa")
    one_layer = sum(p.numel() for p in dense_model.model.layers[0].parameters())
    assert spy.before_calls == [0, 1, 2] == stats.layers_streamed
    # At most one (dense) layer materialised at any time, measured by the spy and by the streamer itself.
    assert spy.most_resident == one_layer == stats.layer_params_max
    assert stats.peak_resident_layer_params == one_layer
    # And every layer went back to meta once written.
    assert all(p.is_meta for layer in spy.seen.values() for p in layer.parameters())
    # Non-layer modules: embeddings + final norm only; lm_head is copied to the output, never loaded.
    embed, norm = dense_model.model.embed_tokens.weight.numel(), dense_model.model.norm.weight.numel()
    assert stats.resident_other_params == embed + norm < embed + norm + dense_model.lm_head.weight.numel()


def test_stream_resume_copies_finished_layers(tmp_path: Path, tokenizer: object) -> None:
    dense = _dense_dir("llama", tmp_path / "dense", tokenizer)
    config, checkpoint = _config(), tmp_path / "ckpt"
    model, _ = _in_memory(dense, config, tmp_path / "memory", tokenizer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stream_prune(dense, config, tmp_path / "stream", calibration(), checkpoint_dir=checkpoint,
                     progress=False, layer_hooks=Spy(fail_after=1))
    assert not (tmp_path / "stream").exists()  # the output is atomic: nothing half-written
    assert any(checkpoint.glob("gen-*/state.json"))  # the committed generation (slimgpt/layerwise/checkpoint.py)

    spy = Spy()
    result = stream_prune(dense, config, tmp_path / "stream", calibration(), checkpoint_dir=checkpoint,
                          resume=True, progress=False, layer_hooks=spy)
    assert spy.before_calls == [2]  # layers 0 and 1 were not recomputed
    assert result.stats.layers_restored == [0, 1] and result.stats.layers_streamed == [2]
    assert len(result.report.layers) == 3
    streamed = AutoModelForCausalLM.from_pretrained(result.output).eval()
    assert torch.allclose(streamed(probe()).logits, model(probe()).logits, atol=1e-5)
    with pytest.raises(ConfigError, match="checkpoint-dir"):
        stream_prune(dense, config, tmp_path / "other", calibration(), resume=True, progress=False)


def test_stream_cli(tmp_path: Path, tokenizer: object, capsys: pytest.CaptureFixture[str]) -> None:
    dense = _dense_dir("llama", tmp_path / "dense", tokenizer)
    out, text = tmp_path / "out", tmp_path / "calib.txt"
    text.write_text(TEXT * 40)  # a local file: the fastest calibration source, and offline
    argv = ["prune", str(dense), "-o", str(out), "--stream", "--ratio", "0.3", "--calib", str(text),
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--json", str(tmp_path / "r.json")]
    assert cli_main(argv) == 0
    assert "saved to" in capsys.readouterr().out
    loaded, _ = slimgpt.load_pruned(out)
    assert loaded(probe()).logits.shape == (2, 24, 96)
    assert not (tmp_path / "out.checkpoint").exists()  # removed after success, as without --stream
    dense_model: Any = make_model("llama")
    dense_decoder = sum(p.numel() for p in dense_model.model.layers.parameters())
    assert json.loads((tmp_path / "r.json").read_text())["decoder_params_after"] < dense_decoder
    assert cli_main(argv) == 2  # the output exists and --overwrite was not given


def test_stream_errors(tmp_path: Path, tokenizer: object, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _dense_dir("llama", tmp_path / "dense", tokenizer)
    # A method that must see every layer before pruning any cannot stream: refused before any work.
    with pytest.raises(ConfigError, match="without --stream"):
        stream_prune(dense, _config(method="flap"), tmp_path / "flap", calibration(), progress=False)
    assert not (tmp_path / "flap").exists()
    # PyTorch .bin checkpoints cannot be read lazily.
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_text((dense / "config.json").read_text())
    torch.save(make_model("llama").state_dict(), binary / "pytorch_model.bin")
    with pytest.raises(SlimGPTError, match="safetensors"):
        stream_prune(binary, _config(), tmp_path / "bin-out", calibration(), progress=False)
    # A Hub id goes through snapshot_download with the streaming file patterns; its errors become one line.
    calls: list[tuple[str, list[str]]] = []

    def fake_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        if repo_id == "org/missing":
            raise OSError("404 Client Error: Repository Not Found\nmore details")
        return str(dense)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    result = stream_prune("org/model", _config(), tmp_path / "hub", calibration(), progress=False)
    assert result.report.model == "org/model" and calls[0] == ("org/model", ["*.json", "*.safetensors", "tokenizer*"])
    with pytest.raises(SlimGPTError, match="Repository Not Found"):
        stream_prune("org/missing", _config(), tmp_path / "hub2", calibration(), progress=False)

