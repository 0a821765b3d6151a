"""Hessian accumulation and safe inversion (docs/paper.md section 3)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from slimgpt.errors import NumericalError

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_DAMPING = 1.0  # x mean(diag(H)): the last damping tried before giving up
# Wider inputs accumulate only H's lower triangle, in this many block rows (about (1 + 1/4) / 2 of the
# full product's multiply-adds), and mirror it when H is read; narrower ones take one full product.
TRIANGLE_BLOCKS = 4
TRIANGLE_FROM = 256


class InputStatistics:
    """Running statistics of a linear layer's inputs over calibration tokens.

    Keeps the mean of 2 x x^T (the OBS Hessian H of the layer-wise squared error, in float32 as the
    authors do), and the per-feature mean, which the FLAP baseline needs. ``full=False`` keeps only
    the diagonal (enough for Wanda-sp and FLAP, and d_in times cheaper). From ``TRIANGLE_FROM`` inputs on,
    a batch adds only the lower triangle (x^T x is symmetric) and ``hessian`` mirrors it when read.
    """

    def __init__(self, d_in: int, device: torch.device | str, full: bool = True) -> None:
        self.full = full
        self.tokens = 0
        shape = (d_in, d_in) if full else (d_in,)
        self.second_moment = torch.zeros(shape, dtype=torch.float32, device=device)
        self.sum = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.lower_only = full and d_in >= TRIANGLE_FROM

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs, shape [..., d_in]."""
        x = x.reshape(-1, x.shape[-1]).to(self.second_moment.device, torch.float32)
        n = x.shape[0]
        total = self.tokens + n
        # Running mean keeps magnitudes bounded however many tokens arrive.
        self.second_moment *= self.tokens / total
        if self.full:
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would cost ~3 digits in H
            try:
                if self.lower_only:
                    _add_lower_gram(self.second_moment, x, 2.0 / total)
                else:
                    self.second_moment.addmm_(x.t(), x, alpha=2.0 / total)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        else:
            self.second_moment.add_(x.square().sum(0), alpha=2.0 / total)
        self.sum += x.sum(0)
        self.tokens = total

    @property
    def hessian(self) -> torch.Tensor:
        if not self.full:
            raise RuntimeError("this accumulator keeps only the diagonal; construct it with full=True")
        if self.lower_only:  # the upper triangle from the lower one (idempotent)
            lower = torch.tril(self.second_moment, -1)
            self.second_moment.tril_().add_(lower.t())
        return self.second_moment

    @property
    def diagonal(self) -> torch.Tensor:
        """diag(H) = 2 E[x_j^2]."""
        return self.second_moment.diagonal() if self.full else self.second_moment

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-feature variance over tokens (FLAP's fluctuation)."""
        return (self.diagonal / 2 - self.mean.square()).clamp_min(0)


def _add_lower_gram(target: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """target's lower triangle (and some blocks above it) += alpha x^T x, one product per block row."""
    d = x.shape[1]
    bounds = [round(i * d / TRIANGLE_BLOCKS) for i in range(TRIANGLE_BLOCKS + 1)]
    for start, end in itertools.pairwise(bounds):
        target[start:end, :end].addmm_(x[:, start:end].t(), x[:, :end], alpha=alpha)


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Return a damped copy of H; zero the weight columns of dead inputs in place.

    Dead inputs (diag(H) == 0: the input is always zero on the calibration data) get H_jj = 1 and
    W[:, j] = 0, as in the authors' code; they cost nothing to remove. Damping adds
    ``percdamp * mean(diag(H))`` to the diagonal.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise NumericalError("the calibration activations are not finite (NaN or inf), so no damping can help: "
                             "check the model's weights and the calibration data (--calib)")
    H = hessian.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    weight[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return H


def damped_inverse(hessian: torch.Tensor, percdamp: float, max_tries: int = 6, what: str = "H") -> torch.Tensor:
    """Inverse of a damped symmetric PSD matrix via Cholesky, raising the damping on failure.

    ``hessian`` must already carry the base damping. Each retry adds ten times more damping and logs
    it. If it still fails, raise NumericalError naming the fix.
    """
    H = hessian
    mean_diag = H.diagonal().mean()
    extra = percdamp
    for attempt in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0 and torch.isfinite(L).all():
            return torch.cholesky_inverse(L)
        extra = extra * 10 if attempt else max(percdamp, 1e-6) * 10
        logger.warning("%s is not positive definite; raising damping to %.3g x mean(diag)", what, extra)
        H = hessian.clone()
        H.diagonal().add_(extra * mean_diag)
    raise NumericalError(
        f"the Hessian {what} is not positive definite even with damping {extra:.3g} x mean(diag(H)); "
        "the calibration activations are degenerate: use more or different calibration data "
        "(--nsamples, --calib) or a larger --percdamp"
    )


def with_escalating_damping(attempt: Callable[[float], T], percdamp: float, what: str = "H",
                            cap: float = MAX_DAMPING) -> tuple[T, float]:
    """Run ``attempt(damping)`` from ``percdamp``; when it finds a Hessian not positive definite, raise
    the damping tenfold (from 1e-3 when it was 0), log it, and retry, up to ``cap``.

    Returns the result and the damping it ended with. Non-finite Hessians fail at once (prepare_hessian).
    """
    damping = percdamp
    while True:
        try:
            return attempt(damping), damping
        except NumericalError as error:
            if "not finite" in str(error) or damping >= cap:
                if damping > percdamp:
                    raise NumericalError(
                        f"the Hessian {what} is not positive definite even with damping {damping:.3g} x mean(diag(H)); "
                        "the calibration activations are degenerate: use more or different calibration data "
                        "(--nsamples, --calib)") from None
                raise
            raised = min(cap, damping * 10 if damping > 0 else 1e-3)
            logger.warning("%s is not positive definite with damping %.3g; raising it to %.3g x mean(diag(H))",
                           what, damping, raised)
            damping = raised
