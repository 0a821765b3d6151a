"""SliceGPT's principal directions: the covariance of RMS-normalised signals, and its eigenvectors (float64)."""

from __future__ import annotations

import torch

from slimgpt.errors import NumericalError

PCA_DAMPING = 0.01  # fraction of the mean eigenvalue added to the covariance's diagonal (the authors' value)


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
