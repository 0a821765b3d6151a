"""GGUF in (slimgpt.models.gguf): tiny LLaMA / Qwen2 models written to GGUF load with the source's logits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from conftest import make_model, probe
from slimgpt.errors import SlimGPTError, UnsupportedModelError
from slimgpt.export.gguf import rope_interleave, write_tokenizer
from slimgpt.models.gguf import convert_gguf, load_gguf, read_gguf_info
from slimgpt.models.slim import load_model

T = gguf.MODEL_TENSOR
Q8_0 = gguf.GGMLQuantizationType.Q8_0
LAYER_ROLES = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
               "self_attn.o_proj": T.ATTN_OUT, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
               "mlp.down_proj": T.FFN_DOWN, "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM}


def _name(kind: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=layer) if layer is not None else name) + f".{suffix}"


def gguf_tensors(model: Any, arch: str) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names and layout (LLaMA q/k rows interleaved for its RoPE)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    out = {_name(T.TOKEN_EMBD, "weight"): model.model.embed_tokens.weight,
           _name(T.OUTPUT_NORM, "weight"): model.model.norm.weight}
    if not cfg.tie_word_embeddings:
        out[_name(T.OUTPUT, "weight")] = model.lm_head.weight
    for index, layer in enumerate(model.model.layers):
        for role, kind in LAYER_ROLES.items():
            module = layer.get_submodule(role)
            for suffix in ("weight", "bias"):
                tensor = getattr(module, suffix, None)
                if tensor is None:
                    continue
                if arch == "llama" and role in ("self_attn.q_proj", "self_attn.k_proj"):
                    tensor = rope_interleave(tensor, head_dim)
                out[_name(kind, suffix, index)] = tensor
    return out


def write_gguf(model: Any, tokenizer: Any, path: Path, arch: str, quant: str) -> Path:
    """``model`` as a GGUF file of ``arch`` ("llama" or "qwen2"): f32, or q8_0 for every matrix.

    A Mistral model is written as llama.cpp writes one: architecture "llama", "mistral" in its name.
    """
    cfg = model.config
    tok_dir = path.parent / f"{path.stem}-tokenizer"
    tokenizer.save_pretrained(tok_dir)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{model.config.model_type}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.ALL_F32)
    write_tokenizer(writer, tok_dir, cfg.vocab_size)
    for name, tensor in gguf_tensors(model, arch).items():
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        if quant == "q8_0" and array.ndim == 2:
            writer.add_tensor(name, quantize(array, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def q8_roundtrip(model: Any) -> Any:
    """A copy of ``model`` whose matrices went through Q8_0 and back (the weights a q8_0 file holds)."""
    copy = make_model(_family(model))
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in copy.parameters():
            if parameter.ndim == 2:
                array = parameter.numpy().astype(np.float32)
                parameter.copy_(torch.from_numpy(dequantize(quantize(array, Q8_0), Q8_0).reshape(array.shape)))
    return copy.eval()


def _family(model: Any) -> str:
    return "qwen2" if model.config.model_type == "qwen2" else "llama-gqa"


def source_model(arch: str) -> Any:
    """Tiny LLaMA (GQA, tied embeddings), Mistral or Qwen2 (q/k/v biases), every weight perturbed."""
    model = make_model({"qwen2": "qwen2", "mistral": "mistral"}.get(arch, "llama-gqa"))
    if arch == "llama":
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of b (max |b|): independent of the logits' magnitude."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f32_gguf_same_logits(arch: str, tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = source_model(arch)
    file_arch = "qwen2" if arch == "qwen2" else "llama"
    path = write_gguf(source, tokenizer, tmp_path / f"{arch}.gguf", file_arch, "f32")
    with caplog.at_level(logging.INFO, logger="slimgpt.models.gguf"):
        model, loaded_tokenizer = load_model(str(path))
    assert "ALL_F32" in caplog.text  # the file type it dequantised from is logged
    # llama.cpp writes Mistral as "llama"; it loads as LLaMA (the same network, no sliding window).
    assert model.config.model_type == file_arch and getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings == (arch == "llama")
    ids = probe()
    with torch.no_grad():
        expected, got = source(ids).logits, model(ids).logits
    assert rel_err(got, expected) < 1e-5
    text = "def add(a, b):"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_gguf_within_quantisation_error(arch: str, tokenizer: Any, tmp_path: Path) -> None:
    source = source_model(arch)
    path = write_gguf(source, tokenizer, tmp_path / f"{arch}-q8.gguf", arch, "q8_0")
    info = read_gguf_info(path)
    assert info.file_type == "MOSTLY_Q8_0" and info.tensor_types["Q8_0"] > 0
    model, _ = load_gguf(path)
    assert next(model.parameters()).dtype == torch.float32
    ids = probe()
    with torch.no_grad():
        exact = source(ids).logits
        roundtrip = q8_roundtrip(source)(ids).logits
        got = model(ids).logits
    # The loaded model is the q8_0 weights exactly: same logits as the source with its matrices rounded
    # through Q8_0 (float32 arithmetic only between them).
    assert rel_err(got, roundtrip) < 1e-5
    # And the rounding itself is small: Q8_0 stores each block of 32 weights as int8 times the block's
    # max/127, an error of at most 1/254 of the block's largest weight (0.4%). Through 3 layers and the
    # head that moves the logits by well under 5% of their scale; the 1e-5 bound above would fail.
    error = rel_err(got, exact)
    assert 1e-5 < error < 0.05


def test_gguf_converts_to_a_plain_folder(tokenizer: Any, tmp_path: Path) -> None:
    source = source_model("llama")
    path = write_gguf(source, tokenizer, tmp_path / "llama.gguf", "llama", "f32")
    folder = convert_gguf(path, tmp_path / "converted")
    assert (folder / "model.safetensors").is_file() and (folder / "slimgpt_gguf_source.json").is_file()
    model, _ = load_model(str(folder))
    with torch.no_grad():
        assert rel_err(model(probe()).logits, source(probe()).logits) < 1e-5
    assert not any(p.name.startswith(".converted") for p in tmp_path.iterdir())  # no temporary left


def test_gguf_errors(tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SlimGPTError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SlimGPTError, match="not a readable GGUF"):
        load_model(str(tmp_path / "junk.gguf"))
    # An architecture transformers reads but slimgpt does not prune: refused before any tensor is read.
    phi3 = write_gguf(source_model("qwen2"), tokenizer, tmp_path / "phi3.gguf", "phi3", "f32")
    with pytest.raises(UnsupportedModelError, match=r"'phi3'.*supported: llama, mistral, qwen2"):
        load_model(str(phi3))
    path = write_gguf(source_model("llama"), tokenizer, tmp_path / "llama.gguf", "llama", "f32")
    import builtins

    real_import = builtins.__import__

    def no_gguf(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "gguf":
            raise ImportError("no gguf", name="gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(SlimGPTError, match=r"pip install .*gguf"):
        load_model(str(path))


def test_cli_prunes_a_gguf_file(tokenizer: Any, tmp_path: Path) -> None:
    from conftest import TEXT
    from slimgpt.cli import main

    path = write_gguf(source_model("qwen2"), tokenizer, tmp_path / "model.gguf", "qwen2", "q8_0")
    (tmp_path / "calib.txt").write_text(TEXT * 40)
    output = tmp_path / "pruned"
    assert main(["prune", str(path), "--ratio", "0.3", "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(output)]) == 0
    pruned, _ = load_model(str(output))
    assert pruned.config.model_type == "slimgpt_qwen2"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in source_model("qwen2").parameters())
