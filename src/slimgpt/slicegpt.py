"""SliceGPT (Ashkboos et al., ICLR 2024) as a slimgpt method: ``--method slicegpt``.

SliceGPT removes width from the residual stream instead of heads and FFN channels:

1. Fold the norms. Every norm's scale (and, for LayerNorm, its shift) moves into the linear maps that
   read its output; LayerNorm's centring moves into everything that writes to the stream (the
   embeddings, o_proj and down_proj get zero-mean outputs). Every norm is then a plain RMS norm, which
   commutes with an orthogonal rotation of the stream: the network's function is unchanged.
2. Layer by layer, on the calibration data as transformed so far: take the principal directions Q of the
   normalised signal entering each block (eigenvectors of its covariance, in float64, by decreasing
   eigenvalue; damping 1% of the mean variance, as the authors), rotate that block's readers and the
   previous block's writers into them, and keep the leading ``d`` directions. Each residual connection
   gets a shortcut matrix ``Q_prev[:, :d]^T Q_next[:, :d]`` that maps one block's basis into the next's.
3. The embeddings are rotated into layer 0's basis; the last layer writes back into the original basis at
   full width, so the final norm and lm_head are unchanged (SliceGPT's default: the head is not sliced).
   A tied lm_head is untied first.

slimgpt compares methods at equal decoder-parameter count, so ``--ratio`` is the fraction of decoder
parameters removed, shortcut matrices counted; the slicing width ``d`` (the same for every layer) is the
one whose decoder parameter count is closest to the target. SliceGPT's own papers quote the fraction of
the hidden width sliced, which removes fewer parameters; the report gives both. The sliced structure and
saved format are in slimgpt.slicing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from slimgpt.adapters import ModelAdapter, get_adapter
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError, NumericalError
from slimgpt.report import LayerReport, PruneReport
from slimgpt.slicing import (
    SlicedRMSNorm,
    layer_widths,
    norm_eps,
    resize_sliced_layer,
    set_embedding_width,
    sliced_layer,
)

logger = logging.getLogger(__name__)

PCA_DAMPING = 0.01  # fraction of the mean eigenvalue added to the covariance's diagonal (the authors' value)


# --- maths --------------------------------------------------------------------------------------------

class Covariance:
    """Running sum of x^T x over tokens of RMS-normalised signals, in float64."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, signal: torch.Tensor) -> None:
        x = signal.reshape(-1, signal.shape[-1]).to(self.matrix.device, torch.float64)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        self.matrix.addmm_(x.T, x)
        self.tokens += x.shape[0]


def principal_directions(cov: torch.Tensor, damping: float = PCA_DAMPING) -> torch.Tensor:
    """Eigenvectors of ``cov`` as columns, by decreasing eigenvalue (float64, orthogonal)."""
    cov = cov.to(torch.float64)
    cov = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    values, vectors = torch.linalg.eigh(cov)
    if not bool(torch.isfinite(values).all()):
        raise NumericalError("the calibration signal's covariance is not finite: check the model's weights and "
                             "the calibration data for NaN / inf")
    return vectors[:, torch.argsort(values, descending=True)]


def sliced_layer_params(adapter: ModelAdapter, layer: Any, widths: tuple[int, int, int]) -> int:
    """Parameters of ``layer`` once sliced to (input, middle, output) widths, shortcuts and norms included."""
    d_in, d_mid, d_out = widths

    def bias(linear: nn.Linear, width: int) -> int:
        return width if linear.bias is not None else 0

    readers = [*adapter.attn_inputs(layer)]
    total = sum(d_in * q.out_features + bias(q, q.out_features) for q in readers)
    o_proj = adapter.attn_output(layer)
    total += o_proj.in_features * d_mid + bias(o_proj, d_mid)
    total += sum(d_mid * m.out_features + bias(m, m.out_features) for m in adapter.mlp_inputs(layer))
    down = adapter.mlp_output(layer)
    total += down.in_features * d_out + bias(down, d_out)
    return total + d_in * d_mid + d_mid * d_out + d_in + d_mid


def slice_dims_for(n_layers: int, width: int, full: int) -> list[int]:
    """Uniform slicing: every stream ``width`` wide except the last layer's output (the head reads ``full``)."""
    return [width] * (2 * n_layers) + [full]


def plan_width(adapter: ModelAdapter, layers: list[nn.Module], ratio: float, round_to: int = 1) -> int:
    """The slicing width (a multiple of ``round_to``) whose decoder parameter count is closest to the target."""
    full = adapter.hidden_size
    before = sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
    target = before * (1 - ratio)

    def params(width: int) -> int:
        dims = slice_dims_for(len(layers), width, full)
        return sum(sliced_layer_params(adapter, layer, layer_widths(dims, i)) for i, layer in enumerate(layers))

    candidates = list(range(round_to, full + 1, round_to)) or [full]
    low, high = 0, len(candidates) - 1  # params() grows with the width: bisect for the last one <= target
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if params(candidates[mid]) <= target else (low, mid - 1)
    near = candidates[low:low + 2]
    return min(near, key=lambda w: (abs(params(w) - target), -w))


# --- surgery -------------------------------------------------------------------------------------------

def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding ``weight`` / ``bias`` (computed in float64) in ``like``'s dtype and device."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    dtype, device = like.weight.dtype, like.weight.device
    new.weight = nn.Parameter(weight.to(device, dtype), requires_grad=like.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(device, dtype), requires_grad=like.weight.requires_grad)
    return new


def _set(layer: Any, adapter: ModelAdapter, path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    adapter._set_linear(layer, path, _linear(weight, bias, layer.get_submodule(path)))


def _weights(linear: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert isinstance(linear, nn.Linear)
    bias = linear.bias.detach().double() if linear.bias is not None else None
    return linear.weight.detach().double(), bias


def rotate_readers(layer: Any, adapter: ModelAdapter, paths: list[str], basis: torch.Tensor) -> None:
    """Linear maps reading the stream now read it in ``basis`` coordinates: W <- W Q."""
    for path in paths:
        weight, bias = _weights(layer.get_submodule(path))
        _set(layer, adapter, path, weight @ basis, bias)


def rotate_writer(layer: Any, adapter: ModelAdapter, path: str, basis: torch.Tensor) -> None:
    """A linear map writing to the stream now writes ``basis`` coordinates: W <- Q^T W, b <- Q^T b."""
    weight, bias = _weights(layer.get_submodule(path))
    _set(layer, adapter, path, basis.T @ weight, basis.T @ bias if bias is not None else None)


def _center_writer(layer: Any, adapter: ModelAdapter, path: str) -> None:
    weight, bias = _weights(layer.get_submodule(path))
    _set(layer, adapter, path, weight - weight.mean(0, keepdim=True), bias - bias.mean() if bias is not None else None)


def fold_layer_norms(layer: Any, adapter: ModelAdapter) -> None:
    """Move each norm's scale / shift into its readers and make it a weight-free RMS norm (same function).

    For LayerNorm families the layer's writers are centred too, so the stream stays zero-mean and
    LayerNorm equals the RMS norm.
    """
    paths = adapter._linear_paths()
    full = adapter.hidden_size
    readers = ([paths["q"], paths["k"], paths["v"]], paths["mlp_in"].split(","))
    for norm_path, reader_paths in zip(adapter.norm_paths(), readers, strict=True):
        norm = layer.get_submodule(norm_path)
        scale = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else None
        shift = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else None
        for path in reader_paths:
            weight, bias = _weights(layer.get_submodule(path))
            if shift is not None:
                if bias is None:
                    raise ConfigError(f"cannot fold the norm shift into {path}: it has no bias")
                bias = bias + weight @ shift
            _set(layer, adapter, path, weight * scale[None, :] if scale is not None else weight, bias)
        like = layer.get_submodule(reader_paths[0]).weight
        setattr(layer, norm_path, SlicedRMSNorm(full, full, norm_eps(norm), device=like.device, dtype=like.dtype))
    if adapter.norm_subtracts_mean:
        for path in (paths["o"], paths["mlp_out"]):
            _center_writer(layer, adapter, path)


def _shortcut(weight: torch.Tensor, like: nn.Linear) -> nn.Linear:
    return _linear(weight, None, like)


def _apply(signal: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates of ``signal`` (original basis) in ``basis`` (float32 product, signal's dtype)."""
    return (signal.to(torch.float32) @ basis.to(signal.device, torch.float32)).to(signal.dtype)


# --- the driver -------------------------------------------------------------------------------------------

class _SliceCheckpoint:
    """Per-layer progress: the sliced layers, the embeddings, the next basis, the signals, the report rows."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def exists(self) -> bool:
        return (self.directory / "state.json").exists()

    def save_embeddings(self, tensors: dict[str, torch.Tensor]) -> None:
        from slimgpt.prune import _atomic_save_tensors

        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_save_tensors(tensors, self.directory / "embeddings.safetensors")

    def save(self, index: int, layer: Any, basis: torch.Tensor, hidden: torch.Tensor,
             state: dict[str, Any]) -> None:
        from slimgpt.prune import _atomic_save_tensors, _atomic_write_text

        _atomic_save_tensors(layer.state_dict(), self.directory / f"layer_{index}.safetensors")
        _atomic_save_tensors({"basis": basis, "hidden": hidden}, self.directory / "stream.safetensors")
        _atomic_write_text(json.dumps(state), self.directory / "state.json")  # last: it commits the layer

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.directory / "state.json").read_text())
        return state

    def load(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.directory / f"{name}.safetensors"))


def _untie_head(model: Any) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False


def _center_embeddings(decoder: Any, adapter: ModelAdapter) -> None:
    for path in adapter.embedding_paths():
        embedding = decoder.get_submodule(path)
        weight = embedding.weight.detach().double()
        set_embedding_width(embedding, weight - weight.mean(1, keepdim=True), weight.shape[1])


@torch.no_grad()
def slice_model(model: Any, config: PruneConfig, calibration: torch.Tensor, *, checkpoint_dir: str | Path | None = None,
                resume: bool = False, model_name: str = "", progress: bool = True,
                stop_after_layer: int | None = None, width: int | None = None) -> PruneReport:
    """Slice ``model`` in place to ``config.ratio`` of its decoder parameters; returns the report.

    width: force the slicing width (tests: the full hidden size gives a rotated but equivalent model).
    """
    from slimgpt.prune import _run_batches, _Stopwatch, _versions, capture_layer_inputs, decoder_params, peak_memory

    adapter = get_adapter(model.config)
    adapter.check_sliceable(model)
    layers = list(adapter.decoder_layers(model))
    full = adapter.hidden_size
    width = width if width is not None else plan_width(adapter, layers, config.ratio, config.round_to)
    dims = slice_dims_for(len(layers), width, full)
    device = torch.device(config.device)
    store = torch.device("cpu") if config.offload else device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logger.info("slicegpt: hidden width %d -> %d (%.1f%% sliced) for %.1f%% of decoder parameters", full, width,
                100 * (1 - width / full), 100 * config.ratio)
    params_before = decoder_params(model, adapter)
    total_before = sum(p.numel() for p in model.parameters())
    layer_before = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    watch = _Stopwatch()
    decoder = model.get_decoder()
    checkpoint = _SliceCheckpoint(Path(checkpoint_dir)) if checkpoint_dir else None
    rows: list[LayerReport] = []
    basis: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    _untie_head(model)
    if checkpoint and resume and checkpoint.exists():
        state = checkpoint.state()
        if state["config"] != config.to_dict() or state["dims"] != dims:
            raise ConfigError(f"the checkpoint in {checkpoint.directory} was made with other options: "
                              "resume with the same options, or remove it to start over")
        for path, weight in checkpoint.load("embeddings").items():
            set_embedding_width(decoder.get_submodule(path), weight, dims[0])
        rows = [LayerReport(**r) for r in state["rows"]]
        for row in rows:
            resize_sliced_layer(layers[row.layer], adapter, layer_widths(dims, row.layer), full)
            layers[row.layer].load_state_dict(checkpoint.load(f"layer_{row.layer}"))
        stream = checkpoint.load("stream")
        basis, hidden = stream["basis"].to(device), stream["hidden"].to(store)
        watch.seconds = state["stage_seconds"]
        logger.info("resuming after layer %d from %s", len(rows) - 1, checkpoint.directory)
    elif adapter.norm_subtracts_mean:
        _center_embeddings(decoder, adapter)

    with watch.stage("calibration_forward", device):  # on resume only the layer kwargs are needed
        captured, kwargs_by_size = capture_layer_inputs(model, adapter, calibration.long(), config.batch_size,
                                                        device, store)
    if hidden is None:
        hidden = captured
        with watch.stage("pca", device):
            cov = Covariance(full, device)
            for _, h, _kw in _run_batches(hidden, kwargs_by_size, config.batch_size, device):
                cov.add(h)
            basis = principal_directions(cov.matrix)
        embeddings = {}
        for path in adapter.embedding_paths():
            embedding = decoder.get_submodule(path)
            set_embedding_width(embedding, embedding.weight.detach().double() @ basis[:, :dims[0]], dims[0])
            embeddings[path] = embedding.weight
        if checkpoint is not None:
            checkpoint.save_embeddings(embeddings)
    del captured
    assert basis is not None

    bar = tqdm(range(len(rows), len(layers)), desc="slicegpt layers", disable=not progress)
    for index in bar:
        start = time.perf_counter()
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        basis = _slice_layer(layer, adapter, layer_widths(dims, index), basis, hidden, kwargs_by_size, config,
                             device, watch, last=index == len(layers) - 1)
        layer.to(home)
        heads = adapter.layer_sizes(layer)
        row = LayerReport(layer=index, ratio=1 - sum(p.numel() for p in layer.parameters()) / layer_before[index],
                          heads_kept=heads.n_heads, heads_total=heads.n_heads, kv_heads_kept=heads.n_kv_heads,
                          kv_heads_total=heads.n_kv_heads, ffn_kept=heads.ffn_dim, ffn_total=heads.ffn_dim,
                          params_before=layer_before[index], params_after=sum(p.numel() for p in layer.parameters()),
                          seconds=time.perf_counter() - start, peak_memory_bytes=peak_memory(device),
                          widths=list(layer_widths(dims, index)))
        rows.append(row)
        logger.info("layer %d: widths %s, %d -> %d parameters", index, row.widths, row.params_before, row.params_after)
        if checkpoint is not None:
            from dataclasses import asdict

            checkpoint.save(index, layer, basis, hidden, {"config": config.to_dict(), "dims": dims,
                                                          "rows": [asdict(r) for r in rows],
                                                          "stage_seconds": watch.seconds})
        if stop_after_layer is not None and index >= stop_after_layer:
            break

    if len(rows) == len(layers):
        _adopt_sliced_config(model, adapter, dims)
    report = PruneReport(
        model=model_name or str(getattr(model.config, "_name_or_path", "")), method="slicegpt",
        config=config.to_dict(), layers=rows, decoder_params_before=params_before,
        decoder_params_after=decoder_params(model, adapter), total_params_before=total_before,
        total_params_after=sum(p.numel() for p in model.parameters()), target_ratio=config.ratio,
        schedule={"name": "uniform-slicing", "high": 1 - width / full, "low": 1 - width / full,
                  "planned_ratio": None, "ratios": [r.ratio for r in rows], "slice_dims": dims},
        calibration={"source": config.calib, "nsamples": int(calibration.shape[0]),
                     "seqlen": int(calibration.shape[1]), "seed": config.seed},
        stage_seconds=dict(watch.seconds), peak_memory_bytes=peak_memory(device), device=str(device),
        versions=_versions(),
    )
    report.schedule["planned_ratio"] = report.realised_ratio
    report.ratio_convention = slicing_convention(report, width, full)
    return report


def _slice_layer(layer: Any, adapter: ModelAdapter, widths: tuple[int, int, int], basis: torch.Tensor,
                 hidden: torch.Tensor, kwargs_by_size: dict[int, dict[str, Any]], config: PruneConfig,
                 device: torch.device, watch: Any, last: bool) -> torch.Tensor:
    """Fold, rotate and slice one layer; ``hidden`` becomes its outputs. Returns the next layer's basis.

    ``hidden`` holds the signals in the original basis at full width (what the sliced network computes,
    mapped back); ``basis`` is the basis of this layer's input (its first ``widths[0]`` columns are kept).
    """
    from slimgpt.prune import _run_batches

    d_in, d_mid, d_out = widths
    paths = adapter._linear_paths()
    full = adapter.hidden_size
    attn_norm, mlp_norm = adapter.norm_paths()
    fold_layer_norms(layer, adapter)
    sliced_layer(layer, adapter)
    like = adapter.attn_output(layer)
    q_in = basis[:, :d_in].to(device)
    rotate_readers(layer, adapter, [paths["q"], paths["k"], paths["v"]], q_in)
    setattr(layer, attn_norm, SlicedRMSNorm(d_in, full, layer.get_submodule(attn_norm).eps, like.weight.device,
                                            like.weight.dtype))
    layer.attn_shortcut = _shortcut(q_in, like)  # back to the original basis while the middle basis is found
    cov = Covariance(full, device)
    with watch.stage("layer_passes", device):
        for part, h, kw in _run_batches(hidden, kwargs_by_size, config.batch_size, device):
            mid = layer.attention_half(_apply(h, q_in), **kw)
            cov.add(mid)
            hidden[part] = mid.to(hidden.device)
    with watch.stage("pca", device):
        q_mid = principal_directions(cov.matrix)[:, :d_mid]
    layer.attn_shortcut = _shortcut(q_mid.T @ q_in, like)
    rotate_writer(layer, adapter, paths["o"], q_mid)
    rotate_readers(layer, adapter, paths["mlp_in"].split(","), q_mid)
    setattr(layer, mlp_norm, SlicedRMSNorm(d_mid, full, layer.get_submodule(mlp_norm).eps, like.weight.device,
                                           like.weight.dtype))
    layer.mlp_shortcut = _shortcut(q_mid, like)
    cov = Covariance(full, device)
    with watch.stage("layer_passes", device):
        for part, h, _kw in _run_batches(hidden, kwargs_by_size, config.batch_size, device):
            out = layer.mlp_half(_apply(h, q_mid))
            if not last:
                cov.add(out)
            hidden[part] = out.to(hidden.device)
    with watch.stage("pca", device):
        next_basis = (torch.eye(full, dtype=torch.float64, device=device) if last
                      else principal_directions(cov.matrix))
    q_out = next_basis[:, :d_out]
    layer.mlp_shortcut = _shortcut(q_out.T @ q_mid, like)
    rotate_writer(layer, adapter, paths["mlp_out"], q_out)
    return next_basis


def _adopt_sliced_config(model: Any, adapter: ModelAdapter, dims: list[int]) -> None:
    from slimgpt.modeling import adopt_slim_config, slim_config_from

    old = model.config
    sizes = [adapter.layer_sizes(layer) for layer in adapter.decoder_layers(model)]
    output_bias = bool(getattr(old, "layer_output_bias", False))
    adopt_slim_config(model, slim_config_from(old, sizes, output_bias=output_bias, slice_dims=dims))


def slicing_convention(report: PruneReport, width: int, full: int) -> str:
    """SliceGPT's own ratio (hidden width sliced) next to slimgpt's (decoder parameters removed)."""
    return (f"SliceGPT quotes the fraction of the hidden width sliced: {1 - width / full:.1%} here ({width} of "
            f"{full} dimensions kept); that removes {report.realised_ratio:.2%} of decoder-layer parameters, "
            f"shortcut matrices counted, and {report.realised_total_ratio:.2%} of all parameters (embeddings "
            "sliced; a tied lm_head is untied and kept whole)")
