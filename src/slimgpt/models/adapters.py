"""Model families behind one interface, asked by role: the HF module names of a decoder layer.

An adapter answers: where are the decoder layers, which linear maps feed and leave attention and the
FFN, how to run a layer's attention half and FFN half, and how to shrink a layer physically. A family
that is not LLaMA-like needs one small class here; every family is one row in
``slimgpt.models.families``, and the contract tests (tests/models/test_adapters.py) run every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimgpt.errors import UnsupportedModelError


@dataclass(frozen=True)
class LayerSizes:
    """Width of one decoder layer: query heads, key/value heads, FFN channels."""

    n_heads: int
    n_kv_heads: int
    ffn_dim: int


def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None,
                 in_index: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the selected output rows / input columns of ``linear`` (works on meta too)."""
    weight: torch.Tensor = linear.weight
    if out_index is not None:
        weight = weight[out_index.to(weight.device)]
    if in_index is not None:
        weight = weight[:, in_index.to(weight.device)]
    bias: torch.Tensor | None = linear.bias
    if bias is not None and out_index is not None:
        bias = bias[out_index.to(bias.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.weight.requires_grad)
    return new


def _linear(layer: Any, path: str) -> nn.Linear:
    module = layer.get_submodule(path)
    assert isinstance(module, nn.Linear)
    return module


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indices of the ``head_dim`` features of each head in ``heads``, concatenated."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).flatten()


class ModelAdapter:
    """Base adapter. Subclasses name the modules of one family."""

    def __init__(self, config: Any) -> None:
        self.config = config

    # --- geometry --------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim or self.config.hidden_size // self.config.num_attention_heads)

    def layer_sizes(self, layer: Any) -> LayerSizes:
        q, k, _ = self.attn_inputs(layer)
        return LayerSizes(q.out_features // self.head_dim, k.out_features // self.head_dim,
                          self.mlp_output(layer).in_features)

    # --- roles ---------------------------------------------------------------------------------------
    def decoder_layers(self, model: Any) -> nn.ModuleList:
        raise NotImplementedError  # pragma: no cover - abstract

    def attention(self, layer: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def attn_inputs(self, layer: Any) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = self.attention(layer)
        return attn.q_proj, attn.k_proj, attn.v_proj

    def attn_output(self, layer: Any) -> nn.Linear:
        raise NotImplementedError  # pragma: no cover - abstract

    def mlp_inputs(self, layer: Any) -> list[nn.Linear]:
        raise NotImplementedError  # pragma: no cover - abstract

    def mlp_output(self, layer: Any) -> nn.Linear:
        raise NotImplementedError  # pragma: no cover - abstract

    def attention_block(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The layer's first half: residual + attention(norm(hidden))."""
        raise NotImplementedError  # pragma: no cover - abstract

    def mlp_block(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's second half: residual + mlp(norm(hidden))."""
        raise NotImplementedError  # pragma: no cover - abstract

    def attention_is_residual(self, layer: Any) -> bool:
        """Whether ``attention_block(layer, h, kw) == h + o_proj(x)``, x being what o_proj receives.

        True for pre-norm layers, where nothing follows o_proj but the residual add: the driver then
        rebuilds the attention half after changing o_proj from the o_proj inputs it kept, instead of
        running q/k/v and softmax again. Post-norm layers normalise after the add and answer False.
        """
        return False

    # --- SliceGPT (slimgpt.slicegpt): the residual stream's readers and writers ----------------------
    norm_subtracts_mean = False  # LayerNorm (OPT) centres its input; RMSNorm (LLaMA-like) does not

    def norm_paths(self) -> tuple[str, str]:
        """Attribute paths of the norm before attention and the norm before the FFN."""
        raise NotImplementedError  # pragma: no cover - abstract

    def attend(self, layer: Any, normed: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The attention output for already-normalised inputs (no residual)."""
        out, _ = self.attention(layer)(hidden_states=normed, **kwargs)
        return out

    def feed_forward(self, layer: Any, normed: torch.Tensor) -> torch.Tensor:
        """The FFN output for already-normalised inputs (no residual)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def embedding_paths(self) -> list[str]:
        """Embeddings added into the residual stream, as paths relative to the decoder."""
        return ["embed_tokens"]

    def check_sliceable(self, model: Any) -> None:
        """Raise UnsupportedModelError if the model's layout has no rotation-invariant form."""

    # --- surgery -------------------------------------------------------------------------------------
    def set_linear(self, layer: Any, path: str, linear: nn.Linear) -> None:
        """Replace the linear at ``path`` (relative to ``layer``) by ``linear``."""
        parent_path, _, name = path.rpartition(".")
        setattr(layer.get_submodule(parent_path) if parent_path else layer, name, linear)

    def linear_paths(self) -> dict[str, str]:
        """Attribute paths (relative to a decoder layer) of q, k, v, o, the FFN inputs and output."""
        raise NotImplementedError  # pragma: no cover - abstract

    def set_head_counts(self, layer: Any, n_heads: int, n_kv_heads: int) -> None:
        """Tell the attention module its new head counts (the eager/SDPA paths read these)."""
        attn = self.attention(layer)
        attn.num_key_value_groups = n_heads // n_kv_heads
        for name, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def shrink_layer(self, layer: Any, keep_heads: torch.Tensor, keep_channels: torch.Tensor) -> None:
        """Physically keep only ``keep_heads`` (query-head indices) and ``keep_channels`` (FFN channels).

        KV heads are kept when any of their query heads is kept; every kept KV group must keep the same
        number of query heads (the GQA layout of HF's attention). Weights of kept parts are unchanged,
        so this changes no output if the removed parts were zero-masked.
        """
        sizes = self.layer_sizes(layer)
        group = sizes.n_heads // sizes.n_kv_heads
        keep_heads = torch.as_tensor(keep_heads, dtype=torch.long, device="cpu").sort().values
        keep_channels = torch.as_tensor(keep_channels, dtype=torch.long, device="cpu").sort().values
        kv_of_head = keep_heads // group
        keep_kv, per_group = kv_of_head.unique(return_counts=True)
        if len(keep_heads) and not bool((per_group == per_group[0]).all()):
            raise ValueError(f"GQA groups would keep unequal numbers of query heads: {per_group.tolist()}")
        paths = self.linear_paths()
        q_cols = head_columns(keep_heads, self.head_dim)
        kv_cols = head_columns(keep_kv, self.head_dim)
        for role, rows in (("q", q_cols), ("k", kv_cols), ("v", kv_cols)):
            self.set_linear(layer, paths[role], slice_linear(_linear(layer, paths[role]), out_index=rows))
        self.set_linear(layer, paths["o"], slice_linear(_linear(layer, paths["o"]), in_index=q_cols))
        for path in paths["mlp_in"].split(","):
            self.set_linear(layer, path, slice_linear(_linear(layer, path), out_index=keep_channels))
        self.set_linear(layer, paths["mlp_out"],
                         slice_linear(_linear(layer, paths["mlp_out"]), in_index=keep_channels))
        self.set_head_counts(layer, len(keep_heads), max(len(keep_kv), 1))

    def resize_layer(self, layer: Any, sizes: LayerSizes) -> None:
        """Shape a freshly built layer to ``sizes`` (weights are loaded afterwards)."""
        full = self.layer_sizes(layer)
        group = sizes.n_heads // max(sizes.n_kv_heads, 1)
        full_group = full.n_heads // full.n_kv_heads
        heads = torch.tensor([g * full_group + j for g in range(sizes.n_kv_heads) for j in range(group)],
                             dtype=torch.long, device="cpu")
        self.shrink_layer(layer, heads, torch.arange(sizes.ffn_dim, device="cpu"))


class LlamaLikeAdapter(ModelAdapter):
    """LLaMA 1/2/3, Vicuna, Mistral, Qwen2: pre-norm RMSNorm, rotary, gated SiLU FFN."""

    def decoder_layers(self, model: Any) -> nn.ModuleList:
        return model.get_decoder().layers

    def attention(self, layer: Any) -> Any:
        return layer.self_attn

    def attn_output(self, layer: Any) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_inputs(self, layer: Any) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def mlp_output(self, layer: Any) -> nn.Linear:
        return layer.mlp.down_proj

    def linear_paths(self) -> dict[str, str]:
        return {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "mlp_in": "mlp.gate_proj,mlp.up_proj", "mlp_out": "mlp.down_proj"}

    def attention_block(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)
        return hidden + attn_out

    def mlp_block(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def attention_is_residual(self, layer: Any) -> bool:
        return True

    def norm_paths(self) -> tuple[str, str]:
        return "input_layernorm", "post_attention_layernorm"

    def feed_forward(self, layer: Any, normed: torch.Tensor) -> torch.Tensor:
        return layer.mlp(normed)


class OPTAdapter(ModelAdapter):
    """OPT: LayerNorm, biases everywhere, fc1/fc2 with ReLU, learned positions."""

    def decoder_layers(self, model: Any) -> nn.ModuleList:
        return model.get_decoder().layers

    def attention(self, layer: Any) -> Any:
        return layer.self_attn

    def attn_output(self, layer: Any) -> nn.Linear:
        return layer.self_attn.out_proj

    def mlp_inputs(self, layer: Any) -> list[nn.Linear]:
        return [layer.fc1]

    def mlp_output(self, layer: Any) -> nn.Linear:
        return layer.fc2

    def linear_paths(self) -> dict[str, str]:
        return {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.out_proj", "mlp_in": "fc1", "mlp_out": "fc2"}

    def attention_block(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        attn_out, _ = layer.self_attn(hidden_states=x, **kwargs)
        out = hidden + attn_out
        return out if layer.do_layer_norm_before else layer.self_attn_layer_norm(out)

    def mlp_block(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        x = layer.final_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        out = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
        return out if layer.do_layer_norm_before else layer.final_layer_norm(out)

    def attention_is_residual(self, layer: Any) -> bool:
        return bool(layer.do_layer_norm_before)  # OPT-350m is post-norm

    norm_subtracts_mean = True

    def norm_paths(self) -> tuple[str, str]:
        return "self_attn_layer_norm", "final_layer_norm"

    def feed_forward(self, layer: Any, normed: torch.Tensor) -> torch.Tensor:
        return layer.fc2(layer.activation_fn(layer.fc1(normed)))

    def embedding_paths(self) -> list[str]:
        return ["embed_tokens", "embed_positions"]

    def check_sliceable(self, model: Any) -> None:
        config = model.config
        if not config.do_layer_norm_before:
            raise UnsupportedModelError("--method slicegpt needs pre-norm layers; this OPT normalises after the "
                                        "residual add (OPT-350m): use another method for it")
        decoder = model.get_decoder()
        if decoder.project_in is not None or decoder.project_out is not None:
            raise UnsupportedModelError("--method slicegpt does not support OPT's project_in / project_out "
                                        "(word_embed_proj_dim != hidden_size)")
        if config.layer_norm_elementwise_affine and not config.enable_bias:
            raise UnsupportedModelError("--method slicegpt folds OPT's LayerNorm shifts into the next layers' "
                                        "biases, and this model has none (enable_bias=False)")
