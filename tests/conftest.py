"""Tiny models of every supported family, built in-process (no download, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, item):\n        self.items.append(item)\n"
    "The quick brown fox jumps over the lazy dog. Pruning removes heads and channels from every layer.\n"
)


def _common(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     max_position_embeddings=128)
    values.update(overrides)
    return values


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of ``family`` (llama, llama-gqa, mistral, qwen2, opt, opt-post-norm)."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common(intermediate_size=96, num_key_value_heads=4)))
    elif family == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(**_common(intermediate_size=96, num_attention_heads=8,
                                                       num_key_value_heads=2)))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(intermediate_size=96, num_attention_heads=8,
                                                           num_key_value_heads=2, sliding_window=64)))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common(intermediate_size=96, num_attention_heads=8,
                                                       num_key_value_heads=2)))
    elif family in ("opt", "opt-post-norm"):  # opt-post-norm: OPT-350m's LayerNorm after each residual add
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, ffn_dim=96, max_position_embeddings=128,
                                         word_embed_proj_dim=64, do_layer_norm_before=family == "opt"))
    else:
        raise ValueError(family)
    # Random init leaves biases and norms trivial; perturb everything so every path is exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


FAMILIES = ["llama", "llama-gqa", "mistral", "qwen2", "opt"]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60], show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def calibration(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=generator)


def rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    """max |actual - expected| within ``rel`` of expected's scale (its largest magnitude)."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max()) <= rel * float(expected.abs().max())


def probe(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 24), generator=generator)


def assert_stream_matches_memory(tmp_path, tokenizer, config, kept) -> None:  # type: ignore[no-untyped-def]
    """``--stream`` on a sharded save of the llama test model gives what pruning in memory gives: the same
    kept units per layer (``kept(layer_report)``) and the same logits (float tolerance)."""
    from transformers import AutoModelForCausalLM

    from slimgpt import prune_model
    from slimgpt.streaming import stream_prune

    dense = tmp_path / "dense"
    make_model("llama").save_pretrained(dense, max_shard_size="50KB")
    tokenizer.save_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    report = prune_model(model, config, calibration(), progress=False)
    result = stream_prune(dense, config, tmp_path / "stream", calibration(), progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(result.output).eval()
    assert [kept(r) for r in result.report.layers] == [kept(r) for r in report.layers]
    with torch.no_grad():
        expected, actual = model(probe()).logits, streamed(probe()).logits
    assert float((actual - expected).abs().max()) <= 1e-6 * max(float(expected.abs().max()), 1e-12)


def assert_refuses_padded_export_and_stream(tmp_path, tokenizer, capsys, pruned_folder, method: str) -> None:  # type: ignore[no-untyped-def]
    """A method whose saved format llama-padded cannot express, and which needs the whole model in memory:
    both refusals are one line naming ``--method <method>``, exit status 2."""
    from slimgpt.cli import main

    dense = tmp_path / "dense"
    make_model("llama").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    capsys.readouterr()
    assert main(["export", str(pruned_folder), "--format", "llama-padded", "--output", str(tmp_path / "padded")]) == 2
    err = capsys.readouterr().err
    assert f"--method {method}" in err and len(err.strip().splitlines()) == 1
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 40)
    code = main(["prune", str(dense), "--method", method, "--stream", "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "16", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"--method {method}" in err and len(err.strip().splitlines()) == 1
