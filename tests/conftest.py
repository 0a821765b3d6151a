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


def probe(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 24), generator=generator)
