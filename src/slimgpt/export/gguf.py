"""GGUF export for llama.cpp, with every layer at its own pruned width (``deci`` architecture).

llama.cpp's ``deci`` architecture (DeciLM / NVIDIA Nemotron-NAS) is LLaMA with per-layer widths: the
metadata arrays ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and
``deci.feed_forward_length`` hold one entry per layer, and the tensors (``blk.N.attn_q`` ...) have
each layer's own shape. That is exactly a slimgpt-pruned LLaMA / Mistral / Qwen2 model, so the file
keeps the pruned size and speed. Per layer, llama.cpp supports:

- normal attention (heads > 0, KV heads > 0), with optional q/k/v/output biases (Qwen2, FLAP);
- attention-free (heads = KV heads = 0): the layer is x + FFN(norm(x));
- FFN-free (FFN width 0): llama.cpp then skips the whole layer, attention included, so it is exact
  only when the attention is absent too.

Shapes it cannot represent directly, and the exact form written instead (reported in ``notes``):

- layer 0 with no heads: llama.cpp derives the head size from layer 0's head count, so layer 0 gets
  one padded head (zero weights, zero output);
- a head-less layer with an attention output bias (FLAP): the attention-free form drops the bias, so
  the layer gets one padded head whose output is that bias;
- an FFN-less layer that keeps attention, or keeps an FFN output bias: one padded channel (zero
  weights) so llama.cpp runs the layer.

Not representable at all (the export refuses): OPT (LayerNorm, ReLU, learned positions), activations
other than SiLU, RoPE scaling other than none / linear / llama3, partial rotary embeddings, and
tokenizers other than byte-level BPE (GPT-2 style); for those, export ``--format llama-padded`` and
use llama.cpp's own ``convert_hf_to_gguf.py``. A Mistral / Qwen2 sliding window is not represented
(``deci`` has none): llama.cpp attends over the whole context, which matches only for sequences up to
the window (reported in ``notes``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from slimgpt._util.files import check_file_output, write_atomic_file
from slimgpt.errors import SlimGPTError, UnsupportedModelError
from slimgpt.export import GGUF_OUTTYPES as OUTTYPES
from slimgpt.export.checkpoint import SavedModel, read_checkpoint

logger = logging.getLogger(__name__)

ARCH = gguf.MODEL_ARCH.DECI
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 byte-level split regex


@dataclass
class LayerForm:
    """What one layer becomes in the file: its widths there, and the pads added to make it exact."""

    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    pad_heads: int = 0  # heads of zeros added (0 or 1)
    pad_channels: int = 0  # FFN channels of zeros added (0 or 1)


@dataclass
class GGUFExport:
    """The written file and what could not be represented as-is (each with the exact form used)."""

    path: Path
    layers: list[LayerForm]
    notes: list[str] = field(default_factory=list)


def _nonzero(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and bool(tensor.ne(0).any())


def layer_forms(checkpoint: SavedModel, notes: list[str]) -> list[LayerForm]:
    """Each layer's form in the file, padding only where llama.cpp's deci graph would not be exact."""
    forms = []
    for index, sizes in enumerate(checkpoint.sizes):
        form = LayerForm(sizes.n_heads, sizes.n_kv_heads, sizes.ffn_dim)
        if sizes.n_heads == 0:
            if index == 0:
                form.pad_heads = 1
                notes.append("layer 0 has no heads; llama.cpp reads the head size from layer 0, so it gets one "
                             "padded head with zero weights (exact)")
            elif _nonzero(checkpoint.layer_tensor(index, "o", "bias")):
                form.pad_heads = 1
                notes.append(f"layer {index} has no heads but an attention output bias; the attention-free form "
                             "drops it, so the layer gets one padded head whose output is the bias (exact)")
            else:
                form.n_kv_heads = 0
                notes.append(f"layer {index} has no heads: written as an attention-free layer")
            if form.pad_heads:
                form.n_heads = form.n_kv_heads = 1
        if sizes.ffn_dim == 0:
            if form.n_heads > 0 or _nonzero(checkpoint.layer_tensor(index, "down", "bias")):
                form.pad_channels = form.ffn_dim = 1
                notes.append(f"layer {index} has no FFN channels; llama.cpp skips a whole layer without an FFN, "
                             "so it gets one padded channel with zero weights (exact)")
            else:
                notes.append(f"layer {index} has neither heads nor FFN channels: written as an identity layer")
        forms.append(form)
    return forms


# --- hyper-parameters -----------------------------------------------------------------------------

def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) from a transformers 5 ``rope_parameters`` or a 4.x config."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or params)
    return float(theta), scaling


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling (Meta's formula; llama.cpp's ``rope_freqs``).

    A frequency whose wavelength is below ``original_max / high_freq_factor`` is kept, above
    ``original_max / low_freq_factor`` it is divided by ``factor``, and in between it is interpolated.
    """
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def check_representable(checkpoint: SavedModel, notes: list[str]) -> None:
    """Refuse what deci cannot compute; note what it computes differently (sliding window)."""
    cfg = checkpoint.config
    if not checkpoint.row.llama_like:
        raise UnsupportedModelError(f"{checkpoint.row.label} cannot be written as GGUF by slimgpt (llama.cpp's "
                                    "per-layer-width architecture is LLaMA-like): export --format llama-padded and "
                                    "convert that with llama.cpp's convert_hf_to_gguf.py")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {cfg.get('hidden_act')!r} is not SiLU, which llama.cpp's deci "
                                    "architecture assumes")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported by llama.cpp's deci architecture")
    _, scaling = rope_settings(cfg)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported by slimgpt's GGUF writer (default, "
                                    "linear, llama3 are): export --format llama-padded and use llama.cpp's converter")
    use_window = cfg.get("use_sliding_window", checkpoint.row.window_by_default)
    window = cfg.get("sliding_window") if use_window else None
    if window is not None and int(window) < int(cfg.get("max_position_embeddings", 0)):
        notes.append(f"sliding window of {window} tokens is not represented (llama.cpp's deci attends over the whole "
                     f"context): outputs match only for sequences of at most {window} tokens")


def write_hparams(writer: gguf.GGUFWriter, checkpoint: SavedModel, forms: list[LayerForm], outtype: str,
                  vocab_size: int) -> None:
    cfg, hd = checkpoint.config, checkpoint.head_dim
    writer.add_name(checkpoint.directory.resolve().name)
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(len(forms))
    writer.add_feed_forward_length([f.ffn_dim for f in forms])
    writer.add_head_count([f.n_heads for f in forms])
    writer.add_head_count_kv([f.n_kv_heads for f in forms])
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    theta, scaling = rope_settings(cfg)
    writer.add_rope_freq_base(theta)
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)


# --- tokenizer ------------------------------------------------------------------------------------

def write_tokenizer(writer: gguf.GGUFWriter, directory: Path, vocab_size: int) -> None:
    """A byte-level BPE ``tokenizer.json`` (GPT-2 style) as llama.cpp's ``gpt2`` tokenizer.

    Ids the tokenizer does not use but the embedding has (padded vocabularies) become unused
    ``[PAD<id>]`` tokens, as llama.cpp's converter does.
    """
    path = directory / "tokenizer.json"
    if not path.exists():
        raise SlimGPTError(f"{directory} has no tokenizer.json: GGUF needs the tokenizer; save it with the model")
    spec = json.loads(path.read_text())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UnsupportedModelError(
            f"tokenizer ({model.get('type')} model, {pre.get('type')} pre-tokenizer) is not a GPT-2 style byte-level "
            "BPE, the only kind slimgpt writes to GGUF: export --format llama-padded and convert that with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more tokenizers"
        )
    if pre.get("add_prefix_space") or spec.get("normalizer"):
        logger.warning("the tokenizer adds a prefix space or normalizes text; llama.cpp's gpt-2 pre-tokenizer does "
                       "neither, so text may tokenize differently (token ids and logits are unaffected)")
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in spec.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise SlimGPTError(f"the tokenizer has ids up to {max(tokens)}, beyond the model's {vocab_size} embeddings")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    # Whether BOS / EOS are added is what the HF tokenizer does, not what llama.cpp assumes by default.
    added_bos, added_eos = _adds_bos_eos(path, special.special_token_ids)
    special.add_special_token.update(bos=added_bos, eos=added_eos)
    special.add_to_gguf(writer, quiet=True)


def _adds_bos_eos(path: Path, ids: dict[str, int]) -> tuple[bool, bool]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    extra = len(full) - len(plain)
    bos = extra > 0 and "bos" in ids and full[0] == ids["bos"] and (not plain or plain[0] != ids["bos"])
    eos = extra > 0 and "eos" in ids and full[-1] == ids["eos"] and (not plain or plain[-1] != ids["eos"])
    return bool(bos), bool(eos)


# --- tensors --------------------------------------------------------------------------------------

def rope_interleave(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotate-half RoPE layout to llama.cpp's adjacent pairs.

    HF rotates feature j with j + head_dim/2; llama.cpp's "normal" RoPE rotates 2i with 2i + 1. Row
    a * head_dim/2 + b of a head (a in {0, 1}) moves to row 2b + a. tensor: [n_heads * head_dim, ...].
    """
    rest = tensor.shape[1:]
    heads = tensor.shape[0] // head_dim
    return tensor.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(tensor.shape)


def tensor_name(kind: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=layer) if layer is not None else name) + f".{suffix}"


def _array(tensor: torch.Tensor, outtype: str) -> np.ndarray:
    """float32, or float16 for matrices when asked (norms and biases stay float32, as llama.cpp's converter does)."""
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    return array.astype(np.float16) if outtype == "f16" and array.ndim > 1 else array


def layer_tensors(checkpoint: SavedModel, index: int, form: LayerForm) -> dict[str, torch.Tensor]:
    """Layer ``index``'s tensors under their GGUF names (HF layout, rows of q/k interleaved for RoPE)."""
    hd, T = checkpoint.head_dim, gguf.MODEL_TENSOR
    hidden = int(checkpoint.config["hidden_size"])

    def get(role: str, kind: str = "weight") -> torch.Tensor | None:
        return checkpoint.layer_tensor(index, role, kind)

    out: dict[str, torch.Tensor] = {}
    if form.n_heads > 0:
        norm = get("attn_norm")
        assert norm is not None
        out[tensor_name(T.ATTN_NORM, "weight", index)] = norm
        pad = form.pad_heads * hd
        for kind, role in ((T.ATTN_Q, "q"), (T.ATTN_K, "k"), (T.ATTN_V, "v")):
            weight, bias = get(role), get(role, "bias")
            assert weight is not None
            if pad:
                weight = torch.cat([weight, weight.new_zeros(pad, hidden)])
                bias = torch.cat([bias, bias.new_zeros(pad)]) if bias is not None else None
            interleave = role in ("q", "k")
            out[tensor_name(kind, "weight", index)] = rope_interleave(weight, hd) if interleave else weight
            if bias is not None:
                out[tensor_name(kind, "bias", index)] = rope_interleave(bias, hd) if interleave else bias
        o = get("o")
        assert o is not None
        out[tensor_name(T.ATTN_OUT, "weight", index)] = torch.cat([o, o.new_zeros(hidden, pad)], dim=1) if pad else o
    o_bias = get("o", "bias")
    if o_bias is not None and form.n_heads > 0:
        out[tensor_name(T.ATTN_OUT, "bias", index)] = o_bias
    if form.ffn_dim > 0:
        norm = get("ffn_norm")
        assert norm is not None
        out[tensor_name(T.FFN_NORM, "weight", index)] = norm
        for kind, role, dim in ((T.FFN_GATE, "gate", 0), (T.FFN_UP, "up", 0), (T.FFN_DOWN, "down", 1)):
            weight = get(role)
            assert weight is not None
            if form.pad_channels:
                shape = list(weight.shape)
                shape[dim] = form.pad_channels
                weight = torch.cat([weight, weight.new_zeros(shape)], dim=dim)
            out[tensor_name(kind, "weight", index)] = weight
            bias = get(role, "bias")
            if bias is not None:
                pad_bias = form.pad_channels if role != "down" else 0
                out[tensor_name(kind, "bias", index)] = torch.cat([bias, bias.new_zeros(pad_bias)])
    return out


def model_tensors(checkpoint: SavedModel, forms: list[LayerForm]) -> dict[str, torch.Tensor]:
    T = gguf.MODEL_TENSOR
    tensors = {tensor_name(T.TOKEN_EMBD, "weight"): checkpoint.tensors["model.embed_tokens.weight"],
               tensor_name(T.OUTPUT_NORM, "weight"): checkpoint.tensors["model.norm.weight"]}
    if not checkpoint.tied_embeddings:
        tensors[tensor_name(T.OUTPUT, "weight")] = checkpoint.tensors["lm_head.weight"]
    theta, scaling = rope_settings(checkpoint.config)
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factors = llama3_rope_factors(scaling, theta, checkpoint.head_dim)
        tensors[tensor_name(T.ROPE_FREQS, "weight")] = torch.from_numpy(factors)
    for index, form in enumerate(forms):
        tensors.update(layer_tensors(checkpoint, index, form))
    return tensors


def export_gguf(directory: str | Path, output: str | Path, outtype: str = "f16", overwrite: bool = False) -> GGUFExport:
    """Write a pruned (or dense) LLaMA / Mistral / Qwen2 folder as one GGUF file for llama.cpp."""
    if outtype not in OUTTYPES:
        raise SlimGPTError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    check_file_output(output, overwrite)
    checkpoint = read_checkpoint(directory)
    notes: list[str] = []
    check_representable(checkpoint, notes)
    forms = layer_forms(checkpoint, notes)
    tensors = model_tensors(checkpoint, forms)
    vocab_size = int(checkpoint.tensors["model.embed_tokens.weight"].shape[0])

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[ARCH])
        write_hparams(writer, checkpoint, forms, outtype, vocab_size)
        write_tokenizer(writer, checkpoint.directory, vocab_size)
        for name, tensor in tensors.items():
            writer.add_tensor(name, _array(tensor, outtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = write_atomic_file(output, fill, overwrite)
    for note in notes:
        logger.warning("%s", note)
    logger.info("wrote %s (%s, %d layers)", path, outtype, len(forms))
    return GGUFExport(path, forms, notes)
