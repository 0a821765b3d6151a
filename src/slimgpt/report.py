"""The pruning report: what was removed where, how much error it cost, and what it cost to compute."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    layer: int
    ratio: float
    heads_kept: int
    heads_total: int
    kv_heads_kept: int
    kv_heads_total: int
    ffn_kept: int
    ffn_total: int
    params_before: int
    params_after: int
    attn_error: float | None = None  # relative ||(W - W')X||^2 / ||WX||^2 of o_proj, with compensation
    attn_error_uncompensated: float | None = None  # the same selection, columns just dropped
    ffn_error: float | None = None
    ffn_error_uncompensated: float | None = None
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    kept_heads: list[int] = field(default_factory=list)
    kept_channels: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)  # SliceGPT: residual widths (input, middle, output)
    # SlimGPT: the damping (x mean(diag(H))) o_proj's / down_proj's solve ended with: --percdamp, or
    # higher where the Hessian was not positive definite and the damping was raised (solver/hessian.py)
    attn_damping: float | None = None
    ffn_damping: float | None = None


@dataclass
class PruneReport:
    model: str
    method: str
    config: dict[str, Any]
    layers: list[LayerReport]
    decoder_params_before: int
    decoder_params_after: int
    total_params_before: int
    total_params_after: int
    target_ratio: float
    schedule: dict[str, Any]
    calibration: dict[str, Any]
    stage_seconds: dict[str, float]
    peak_memory_bytes: int
    device: str
    versions: dict[str, str]
    # How this method's own papers / code quote a ratio, with this run's numbers in that convention
    # (methods are compared at equal realised decoder ratio; their papers count differently).
    ratio_convention: str = ""
    # The model card's text about the method (from the method itself: slimgpt.methods).
    method_summary: str = ""
    method_options: str = ""
    # Extra files a method writes beside the report (name -> text; DISP-LLM's loss log); not in the JSON.
    artifacts: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def realised_ratio(self) -> float:
        return 1 - self.decoder_params_after / self.decoder_params_before

    @property
    def realised_total_ratio(self) -> float:
        """Fraction of ALL parameters removed (embeddings and lm_head included)."""
        return 1 - self.total_params_after / self.total_params_before

    def to_dict(self, with_indices: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data.pop("artifacts")
        data["realised_ratio"] = self.realised_ratio
        data["realised_total_ratio"] = self.realised_total_ratio
        if not with_indices:
            for layer in data["layers"]:
                layer.pop("kept_heads")
                layer.pop("kept_channels")
        return data

    def to_json(self, with_indices: bool = False) -> str:
        return json.dumps(self.to_dict(with_indices), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneReport:
        data = dict(data)
        data.pop("realised_ratio", None)
        data.pop("realised_total_ratio", None)
        data["layers"] = [LayerReport(**layer) for layer in data["layers"]]
        return cls(**data)

    def to_markdown(self) -> str:
        def err(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        lines = [
            f"**{self.method}** on `{self.model}`: decoder parameters {self.decoder_params_before:,} -> "
            f"{self.decoder_params_after:,} (target {self.target_ratio:.1%}, realised {self.realised_ratio:.2%}); "
            f"total {self.total_params_before:,} -> {self.total_params_after:,}",
            *([f"Ratio convention: {self.ratio_convention}"] if self.ratio_convention else []),
            "",
            "| layer | ratio | heads | kv heads | ffn | o_proj err (comp / drop) | down_proj err (comp / drop) | s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in self.layers:
            lines.append(
                f"| {row.layer} | {row.ratio:.3f} | {row.heads_kept}/{row.heads_total} | "
                f"{row.kv_heads_kept}/{row.kv_heads_total} | {row.ffn_kept}/{row.ffn_total} | "
                f"{err(row.attn_error)} / {err(row.attn_error_uncompensated)} | "
                f"{err(row.ffn_error)} / {err(row.ffn_error_uncompensated)} | {row.seconds:.2f} |"
            )
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        lines += ["", f"Stages: {stages}; peak memory {self.peak_memory_bytes / 2**20:,.0f} MiB on {self.device}."]
        return "\n".join(lines)


def decoder_ratio_convention(report: PruneReport) -> str:
    """SlimGPT's convention (and slimgpt's ``--ratio``): the fraction of decoder-layer parameters."""
    return (f"ratio = fraction of decoder-layer parameters removed (embeddings and lm_head excluded): "
            f"{report.realised_ratio:.2%}; {report.realised_total_ratio:.2%} of all parameters")
