"""Least-squares restoration of the input columns a pruning method keeps.

Removing the input columns P of a consumer matrix W (d_out x n) and keeping M, the survivors that best
reproduce W X on the calibration inputs (H = X X^T, any positive scale) are

    W'[:, M] = W H[:, M] (H[M, M] + lambda I)^-1,

which equals the OBS closed form with the same damping (slimgpt.solver.obs). It is the restorer of
SlimGPT's compensation, of the FFN re-fit of MoDeGPT (slimgpt.methods.modegpt) and of FASP.
"""

from __future__ import annotations

import torch


def restore_least_squares(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
                          damp: float = 0.01) -> torch.Tensor:
    """The full-shape least-squares weight on the columns ``keep``; removed columns are zero.

    weight: W [d_out, n]; hessian: H [n, n] of W's inputs; keep: the kept column indices M. Damping:
    lambda = ``damp`` * mean(diag H), added to H[M, M]. Solved in float64, returned in W's dtype.
    """
    keep = torch.as_tensor(keep, dtype=torch.long, device=weight.device)
    H = hessian.to(weight.device, torch.float64)
    W = weight.to(torch.float64)
    lam = damp * float(H.diagonal().mean())
    H_mm = H[keep][:, keep] + lam * torch.eye(len(keep), dtype=torch.float64, device=weight.device)
    rhs = W @ H[:, keep]  # [d_out, |M|]
    solved = torch.linalg.solve(H_mm, rhs.T).T  # H_mm is symmetric: (H_mm^-1 rhs^T)^T = rhs H_mm^-1
    out = torch.zeros_like(W)
    out[:, keep] = solved
    return out.to(weight.dtype)
