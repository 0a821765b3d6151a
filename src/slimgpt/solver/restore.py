"""Least-squares restoration of the surviving input columns of a linear layer.

W (d_out x d_in) reads inputs X (d_in x N); H = 2 X X^T / N (slimgpt.solver.hessian.InputStatistics).
Removing the input columns P and keeping M, the kept weights that reproduce W X best on the calibration
inputs, with a ridge term lam ||W'||^2, are

    W'[:, M] = W H[:, M] (H[M, M] + lam I)^-1,        W'[:, P] = 0,

the normal equations of min_{W'} ||W X - W'_M X_M||^2 + lam ||W'_M||^2 (up to the factor 2 / N).
With lam = 0 this equals the OBS block update W - W_P (Hinv_PP)^-1 Hinv_P: of slimgpt.solver.obs, by the
block-inverse identity (Hinv_PP)^-1 Hinv_PM = -H_PM H_MM^-1; so handing this function the damped H that
SlimGPT's solvers use (slimgpt.solver.hessian.prepare_hessian) and ``damp=0`` gives SlimGPT's compensated
weights for the same removed set (tests/methods/test_fasp.py).

Two ways to damp: ``damp`` adds lam to H[M, M] only (the ridge form above: the survivors are pulled
towards zero); passing H + lam I with ``damp=0`` damps the whole diagonal, which gives
W'_M = W_M + W_P H[P, M] (H[M, M] + lam I)^-1 (the survivors are pulled towards their dense values).
slimgpt.methods.fasp uses the second, SlimGPT's.
"""

from __future__ import annotations

import torch

from slimgpt.errors import NumericalError


def column_indices(keep: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``keep`` as a 1-D index tensor on ``device``: indices as they are, a boolean mask as its True places."""
    indices = keep.to(device)
    return indices.nonzero().flatten() if indices.dtype == torch.bool else indices


def restore_least_squares(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
                          damp: float = 0.01) -> torch.Tensor:
    """W' with W'[:, M] = W H[:, M] (H[M, M] + lam I)^-1 and the removed columns zero.

    weight: W [d_out, d_in]; hessian: H [d_in, d_in], symmetric PSD; keep: the kept column indices M
    ([|M|], long) or a [d_in] boolean mask. ``lam = damp * mean(diag(H))``, the scale of SlimGPT's
    ``--percdamp``. A dead input (H_jj = 0: always zero on the calibration data) gets H_jj = 1 and a zero
    weight column first, as in slimgpt.solver.hessian.prepare_hessian (the column cannot matter on the
    calibration data), so its restored weight is zero and H_MM stays definite without damping. Solved in
    float64 with a Cholesky factor (no explicit inverse); returns [d_out, d_in] in W's dtype, on W's device.
    """
    d_in = weight.shape[1]
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"H has shape {tuple(hessian.shape)}, W has {d_in} input columns")
    kept = column_indices(keep, weight.device)
    W = weight.to(torch.float64, copy=True)
    H = hessian.to(weight.device, torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    restored = torch.zeros_like(W)
    if kept.numel() == 0:
        return restored.to(weight.dtype)
    H_MM = H[kept][:, kept]
    H_MM.diagonal().add_(damp * float(H.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(H_MM)
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        raise NumericalError("the kept block of the Hessian is not positive definite; raise the damping "
                             "(--percdamp, e.g. 0.1) or use more calibration data (--nsamples)")
    # (H_MM + lam I) is symmetric, so W' = (H_MM + lam I)^-1 (W H_:M)^T, transposed.
    target = W @ H[:, kept]  # [d_out, |M|]
    restored[:, kept] = torch.cholesky_solve(target.t(), factor).t()
    return restored.to(weight.dtype)
