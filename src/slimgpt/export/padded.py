"""Zero-pad a pruned model back to a stock config: loads anywhere, exactly equivalent, no speed-up.

Every layer gets the dense model's widths again (heads, key/value heads, FFN channels), so a plain
``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` / ``OPTConfig`` describes it and every runtime
(transformers without slimgpt, vLLM, llama.cpp's converter, ...) loads it. The padding is exact:

- A padded query head has zero query rows and zero ``o_proj`` columns. Whatever it attends to, its
  output is multiplied by zeros, so it contributes nothing.
- A kept query head must still attend over its own key/value head. In the stock GQA layout query head
  ``j`` reads KV head ``j // G`` (G = heads / KV heads of the stock config), so each kept KV head is
  placed in a KV slot and its kept query heads in that slot's G query slots. A layer may keep more
  query heads per KV head than G (never after slimgpt's policies, which keep whole groups or shrink
  every group alike); then the KV head is copied into as many slots as it needs, still exact. Padded
  KV heads (zero K and V) serve only padded query heads: zero keys do get softmax weight, but only
  inside heads whose output is discarded. If the copies do not fit in the stock KV heads, the export
  falls back to one KV head per query head (a larger KV cache, still exact).
- A padded FFN channel has zero gate/up rows (and biases), so its activation is silu(0) * 0 = 0 (OPT:
  relu(0) = 0), times zero ``down_proj`` columns.

The padded model computes exactly what the pruned one does plus additions of exact zeros, so logits
agree to float rounding; it is as large and as slow as the dense model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from slimgpt._util.files import write_atomic_dir
from slimgpt.errors import SlimGPTError
from slimgpt.export.checkpoint import SavedModel, copy_files, read_checkpoint, support_files
from slimgpt.models.adapters import LayerSizes
from slimgpt.models.families import FAMILIES, Family

logger = logging.getLogger(__name__)

# Config keys that only the Qwen2 / Mistral sliding-window attention reads (dropped when a model
# becomes a LLaMA config, which is allowed only when no window is in effect).
SLIDING_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
SLIM_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes",
             "layer_output_bias", "auto_map")


@dataclass(frozen=True)
class HeadPlacement:
    """Where one layer's kept heads go in the padded layer.

    query_slots[i]: padded query-head slot of kept query head i (kept heads in saved order).
    kv_sources[s]: kept KV head copied into padded KV slot s, or -1 for a padded (zero) slot.
    """

    query_slots: list[int]
    kv_sources: list[int]


def place_heads(sizes: LayerSizes, n_heads: int, n_kv_heads: int) -> HeadPlacement | None:
    """Place a layer's kept heads in a stock layer of ``n_heads`` / ``n_kv_heads``; None if they do not fit.

    Kept query head i reads kept KV head i // g (g = its layer's heads per KV head), as in HF's layout.
    """
    group = n_heads // n_kv_heads
    if sizes.n_heads == 0:
        return HeadPlacement([], [-1] * n_kv_heads)
    g = sizes.n_heads // sizes.n_kv_heads
    copies = math.ceil(g / group)  # KV slots each kept KV head needs
    if sizes.n_kv_heads * copies > n_kv_heads:
        return None
    query_slots = []
    for i in range(sizes.n_heads):
        kv, j = divmod(i, g)
        slot = kv * copies + j // group
        query_slots.append(slot * group + j % group)
    kv_sources = [-1] * n_kv_heads
    for kv in range(sizes.n_kv_heads):
        for c in range(copies):
            kv_sources[kv * copies + c] = kv
    return HeadPlacement(query_slots, kv_sources)


def stock_widths(checkpoint: SavedModel) -> tuple[LayerSizes, list[HeadPlacement]]:
    """The uniform widths of the padded model and each layer's head placement."""
    stock = checkpoint.stock_sizes
    widest = max(s.n_heads for s in checkpoint.sizes)
    if widest > stock.n_heads:
        raise SlimGPTError(f"a layer has {widest} heads, more than the config's num_attention_heads "
                           f"({stock.n_heads}): the folder is not a pruned model of that config")
    ffn = max(stock.ffn_dim, *(s.ffn_dim for s in checkpoint.sizes))
    placements = [place_heads(s, stock.n_heads, stock.n_kv_heads) for s in checkpoint.sizes]
    kv_heads = stock.n_kv_heads
    if any(p is None for p in placements):
        logger.warning("kept query heads per KV head exceed the stock group size in some layer: padding to one "
                       "KV head per query head (exact, larger KV cache)")
        kv_heads = stock.n_heads
        placements = [place_heads(s, stock.n_heads, kv_heads) for s in checkpoint.sizes]
    return LayerSizes(stock.n_heads, kv_heads, ffn), [p for p in placements if p is not None]


def _head_rows(tensor: torch.Tensor, slots: list[int], n_slots: int, head_dim: int,
               dim: int = 0) -> torch.Tensor:
    """Scatter head blocks of ``tensor`` (along ``dim``) into ``n_slots`` zero blocks: block i goes to slots[i]."""
    moved = tensor.movedim(dim, 0)
    out = moved.new_zeros((n_slots * head_dim, *moved.shape[1:]))
    for i, slot in enumerate(slots):
        out[slot * head_dim:(slot + 1) * head_dim] = moved[i * head_dim:(i + 1) * head_dim]
    return out.movedim(0, dim).contiguous()


def _kv_rows(tensor: torch.Tensor, sources: list[int], head_dim: int) -> torch.Tensor:
    """Padded K/V rows: slot s holds kept KV head sources[s] (copies allowed), or zeros."""
    out = tensor.new_zeros((len(sources) * head_dim, *tensor.shape[1:]))
    for slot, source in enumerate(sources):
        if source >= 0:
            out[slot * head_dim:(slot + 1) * head_dim] = tensor[source * head_dim:(source + 1) * head_dim]
    return out


def _pad_rows(tensor: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """``tensor`` followed by zeros up to ``n`` entries along ``dim``."""
    shape = list(tensor.shape)
    shape[dim] = n - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


@dataclass(frozen=True)
class BiasPlan:
    """Which projection groups of the padded model carry biases (zeros where the source has none)."""

    qkv: bool
    o: bool
    ffn_in: bool
    ffn_out: bool


def _has_bias(checkpoint: SavedModel, roles: tuple[str, ...]) -> bool:
    return any(checkpoint.layer_tensor(i, role, "bias") is not None
               for i in range(len(checkpoint.sizes)) for role in roles if role in checkpoint.names)


def _check_no_window(row: Family, cfg: dict[str, Any], target: Family) -> None:
    """A model leaving its family for ``target`` (which has no sliding window) must not use one."""
    family = row.model_type
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", row.window_by_default) else None
    if window is not None and int(window) < int(cfg.get("max_position_embeddings", 0)):
        raise SlimGPTError(
            f"this pruned {family} model has output biases, which a stock {family} config cannot hold, and a "
            f"sliding window ({window}) that a {target.label} config cannot hold: no stock config is exact; use "
            "--format remote-code"
        )
    logger.info("%s with output biases exported as a %s config (same network without a sliding window)",
                family, target.label)


def stock_family_and_biases(checkpoint: SavedModel) -> tuple[str, BiasPlan, dict[str, Any]]:
    """The stock family that can hold the model's biases, its bias layout and config overrides.

    The family row says what its stock config holds (slimgpt.models.families.StockBiases): stock
    Qwen2 has q/k/v biases only and stock Mistral none; a pruned model with output biases (FLAP)
    becomes the row's fallback, a LLaMA config (``attention_bias`` / ``mlp_bias``), which is the same
    network when no sliding window is in effect.
    """
    row, cfg = checkpoint.row, checkpoint.config
    present = (_has_bias(checkpoint, ("q", "k", "v")), _has_bias(checkpoint, ("o",)),
               _has_bias(checkpoint, row.ffn_input_roles), _has_bias(checkpoint, ("down",)))
    target = row
    fixed = row.biases.fixed
    if fixed is not None:
        if all(built or not has for built, has in zip(fixed, present, strict=True)):
            return row.model_type, BiasPlan(*fixed), {}
        if row.biases.fallback is None:
            raise SlimGPTError(f"this pruned {row.model_type} model has biases that a stock {row.model_type} "
                               "config cannot hold: use --format remote-code")
        target = FAMILIES[row.biases.fallback]
        _check_no_window(row, cfg, target)
    switches = target.biases.switches
    needed: dict[str, bool] = {}
    for key, has in zip(switches, present, strict=True):
        needed[key] = needed.get(key, False) or has
    overrides = {key: has or bool(cfg.get(key, target.biases.switch_default)) for key, has in needed.items()}
    return target.model_type, BiasPlan(*(overrides[key] for key in switches)), overrides


def _bias(checkpoint: SavedModel, index: int, role: str, size: int, like: torch.Tensor) -> torch.Tensor:
    bias = checkpoint.layer_tensor(index, role, "bias")
    return bias if bias is not None else like.new_zeros(size)


def padded_layer(checkpoint: SavedModel, index: int, target: LayerSizes, placement: HeadPlacement,
                 biases: BiasPlan) -> dict[str, torch.Tensor]:
    """The padded tensors of layer ``index``, by saved name (norms are copied by the caller)."""
    hd, sizes, names = checkpoint.head_dim, checkpoint.sizes[index], checkpoint.names
    prefix = checkpoint.layer_prefix(index)
    out: dict[str, torch.Tensor] = {}

    def put(role: str, kind: str, tensor: torch.Tensor) -> None:
        out[f"{prefix}{names[role]}.{kind}"] = tensor

    def weight(role: str) -> torch.Tensor:
        tensor = checkpoint.layer_tensor(index, role)
        assert tensor is not None
        return tensor

    q, k, v, o = weight("q"), weight("k"), weight("v"), weight("o")
    put("q", "weight", _head_rows(q, placement.query_slots, target.n_heads, hd))
    put("k", "weight", _kv_rows(k, placement.kv_sources, hd))
    put("v", "weight", _kv_rows(v, placement.kv_sources, hd))
    put("o", "weight", _head_rows(o, placement.query_slots, target.n_heads, hd, dim=1))
    if biases.qkv:
        put("q", "bias", _head_rows(_bias(checkpoint, index, "q", sizes.n_heads * hd, q), placement.query_slots,
                                    target.n_heads, hd))
        for role, tensor in (("k", k), ("v", v)):
            put(role, "bias", _kv_rows(_bias(checkpoint, index, role, sizes.n_kv_heads * hd, tensor),
                                       placement.kv_sources, hd))
    if biases.o:
        put("o", "bias", _bias(checkpoint, index, "o", o.shape[0], o))
    for role in checkpoint.row.ffn_input_roles:
        tensor = weight(role)
        put(role, "weight", _pad_rows(tensor, target.ffn_dim))
        if biases.ffn_in:
            put(role, "bias", _pad_rows(_bias(checkpoint, index, role, sizes.ffn_dim, tensor), target.ffn_dim))
    down = weight("down")
    put("down", "weight", _pad_rows(down, target.ffn_dim, dim=1))
    if biases.ffn_out:
        put("down", "bias", _bias(checkpoint, index, "down", down.shape[0], down))
    return out


def _is_projection(checkpoint: SavedModel, name: str) -> bool:
    roles = [r for r in checkpoint.names if r not in ("attn_norm", "ffn_norm")]
    return any(name.endswith((f".{checkpoint.names[r]}.weight", f".{checkpoint.names[r]}.bias")) for r in roles)


def padded_state(checkpoint: SavedModel) -> tuple[dict[str, torch.Tensor], dict[str, Any], LayerSizes]:
    """The padded model's tensors, its stock config (a dict for config.json) and its uniform widths."""
    target, placements = stock_widths(checkpoint)
    family, biases, overrides = stock_family_and_biases(checkpoint)
    state = {name: tensor for name, tensor in checkpoint.tensors.items() if not _is_projection(checkpoint, name)}
    for index, placement in enumerate(placements):
        state.update(padded_layer(checkpoint, index, target, placement, biases))
    config = {k: v for k, v in checkpoint.config.items() if k not in SLIM_KEYS}
    if family != checkpoint.family:
        config = {k: v for k, v in config.items() if k not in SLIDING_WINDOW_KEYS}
    config.update(overrides)
    row = FAMILIES[family]
    config.update(model_type=family, architectures=[row.stock_architecture], num_attention_heads=target.n_heads)
    config[row.ffn_size_key] = target.ffn_dim
    if row.kv_heads_key:
        config["num_key_value_heads"] = target.n_kv_heads
    if row.head_dim_key:
        config["head_dim"] = checkpoint.head_dim
    return state, config, target


def save_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_size: str = "5GB") -> None:
    """Write ``state`` as safetensors shards (with an index when there is more than one), like HF does."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def padded_readme(source: Path, family: str, target: LayerSizes) -> str:
    architecture = FAMILIES[family].stock_architecture
    return f"""# {source.name}: slimgpt-pruned model, zero-padded to a stock {family} config

Exported with `slimgpt export --format llama-padded`. The removed attention heads and FFN channels are
back as exact zeros, so every layer has the stock widths ({target.n_heads} heads, {target.n_kv_heads} key/value
heads, {target.ffn_dim} FFN channels) and a plain `{architecture}` loads it, with no slimgpt and no
remote code. The outputs equal the pruned model's, but the model is as large and as slow as the dense
one: this format is for compatibility, not speed. The pruning report is in `slimgpt_report.json`.
"""


def export_padded(directory: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write the zero-padded stock-config copy of a pruned folder to ``output`` (atomically)."""
    source = Path(directory)
    checkpoint = read_checkpoint(source)
    state, config, target = padded_state(checkpoint)

    def fill(tmp: Path) -> None:
        copy_files([p for p in support_files(source) if p.name not in ("README.md", "configuration_slimgpt.py",
                                                                        "modeling_slimgpt.py")], tmp)
        save_safetensors(state, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(padded_readme(source, config["model_type"], target))

    path = write_atomic_dir(output, fill, overwrite)
    logger.info("wrote %s (stock %s, padded)", path, config["model_type"])
    return path
