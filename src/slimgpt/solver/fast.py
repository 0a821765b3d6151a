"""The fast exact solver: one inversion, then Schur-complement downdates on the surviving block only.

Removing a set P from the surviving columns S (R = S minus P) changes the inverse Hessian over the
survivors to its Schur complement, which is exactly the inverse of H_RR:

    (H_RR)^-1 = Hinv_RR - Hinv_RP Hinv_PP^-1 Hinv_PR

and compensates the surviving weights with the OBS block update W_R -= W_P Hinv_PP^-1 Hinv_PR. Both are
one GEMM with inner dimension |P|, against a fresh O(d^3) inversion per round for the reference solver.
"""

from __future__ import annotations

import math

import torch

from slimgpt.solver.base import _Solver
from slimgpt.solver.linalg import block_scores, cholesky, spd_inverse


class FastSolver(_Solver):
    """Exact downdates of Hinv instead of re-inversion (method spec section 6), kept compact.

    Layout: positions 0..m-1 of ``_hinv`` (rows and columns) and of ``_w`` (columns) hold the m
    surviving columns; ``_order[i]`` is the original index of the column at position i and
    ``_position`` the inverse map. Removing P moves the survivors that sit behind position m - |P| into
    the holes P leaves in front, so the survivors stay one leading block [:m, :m]. Every later GEMM,
    score and pass then works on that block alone (a strided view, no copy): nothing of the full d x d
    size is masked, symmetrised or index-put per round, and removed columns cost nothing any more.
    Permuting rows and columns together is a similarity transform, so the maths is unchanged.
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> None:
        super().__init__(weight, hessian, compensate)
        d = weight.shape[1]
        self._w = weight.to(self.dtype).clone()  # [d_out, d]; live columns [:, :m]
        self._hinv = spd_inverse(hessian.to(self.dtype))  # [d, d]; live block [:m, :m]
        self._order = torch.arange(d, device=weight.device)
        self._position = self._order.clone()
        self._m = d

    @property
    def weight(self) -> torch.Tensor:
        """The full d_out x d_in weight, removed columns zero (built on each access: O(d_out d_in))."""
        full = torch.zeros_like(self._w)
        return full.index_copy_(1, self._order[:self._m], self._w[:, :self._m])

    @property
    def pruned(self) -> torch.Tensor:
        mask = torch.ones(self._w.shape[1], dtype=torch.bool, device=self._w.device)
        mask[self._order[:self._m]] = False
        return mask

    def inverse(self) -> torch.Tensor:
        """Full-size inverse over the survivors, removed columns decoupled (for tests: O(d^2))."""
        alive = self._order[:self._m]
        full = torch.eye(self._w.shape[1], dtype=self.dtype, device=self._w.device)
        full[alive[:, None], alive[None, :]] = self._hinv[:self._m, :self._m]
        return full

    def _compact(self, holes: torch.Tensor, fillers: torch.Tensor) -> None:
        """Move the survivors at positions ``fillers`` (at the tail) into ``holes`` (removed, in front)."""
        m = self._m
        live = self._hinv[:m, :m]
        live.index_copy_(0, holes, live.index_select(0, fillers))  # rows, then columns: P A P^T
        live.index_copy_(1, holes, live.index_select(1, fillers))
        w = self._w[:, :m]
        w.index_copy_(1, holes, w.index_select(1, fillers))
        self._order[holes] = self._order[fillers]
        self._position[self._order[holes]] = holes

    def remove(self, columns: torch.Tensor) -> None:
        m, p = self._m, columns.numel()
        r = m - p  # survivors after this round
        pos = self._position[columns.to(self._order.device)]  # [p]
        if bool((pos >= m).any()) or len(torch.unique(pos)) != p:
            raise ValueError("a column is already removed (or given twice); each column can go once")
        live = self._hinv[:m, :m]
        rows = live.index_select(0, pos)  # [p, m]: Hinv_P. (a copy: compaction overwrites the block)
        factor = cholesky(rows.index_select(1, pos))  # Hinv_PP = L L^T
        W_P = self._w[:, :m].index_select(1, pos)  # [d_out, p]
        # Holes: removed columns in front of r. Fillers: survivors behind r, as many, both sorted.
        in_tail = torch.zeros(m - r, dtype=torch.bool, device=pos.device)
        in_tail[pos[pos >= r] - r] = True
        holes = pos[pos < r].sort().values
        fillers = (~in_tail).nonzero().flatten() + r
        source = torch.arange(r, device=pos.device)
        source[holes] = fillers  # new position i < r holds what was at position source[i]
        R = rows.index_select(1, source)  # [p, r]: Hinv_PR in the compacted order
        self._compact(holes, fillers)
        self._position[columns.to(self._order.device)] = self._w.shape[1]  # past any live position
        self._m = r
        if r == 0:
            return
        solved = torch.cholesky_solve(R, factor)  # [p, r]: Hinv_PP^-1 Hinv_PR, no explicit inverse
        if self.compensate:
            self._w[:, :r].addmm_(W_P, solved, alpha=-1)  # OBS block update of the survivors
        self._hinv[:r, :r].addmm_(R.mT, solved, alpha=-1)  # Schur complement: inverse of H_RR

    def channel_errors(self) -> torch.Tensor:
        m = self._m
        errors = torch.linalg.vector_norm(self._w[:, :m], dim=0).square_() / self._hinv[:m, :m].diagonal()
        full = torch.full((self._w.shape[1],), math.inf, dtype=errors.dtype, device=errors.device)
        return full.index_copy_(0, self._order[:m], errors)

    def unit_scores(self, units: torch.Tensor, alive: torch.Tensor, mode: str) -> torch.Tensor:
        positions = self._position[units.to(self._position.device)]  # [n_units, g]
        # Units with a removed column cannot go again (their positions are stale), whatever ``alive`` says.
        live_units = (alive & (positions < self._m).all(1).cpu()).nonzero().flatten()
        pos = positions[live_units.to(positions.device)]  # [U, g]
        blocks = self._hinv[pos[:, :, None], pos[:, None, :]]  # [U, g, g]: Hinv_PP of each unit
        scores = torch.full((len(units),), math.inf, dtype=self.dtype)
        if len(live_units) == 0:
            return scores
        if mode == "gcd":
            scores[live_units] = (self._unit_grams(pos) * torch.cholesky_inverse(cholesky(blocks))).sum((1, 2)).cpu()
        else:
            scores[live_units] = block_scores(blocks, self._w[:, pos].permute(1, 2, 0), mode).cpu()
        return scores

    def _unit_grams(self, pos: torch.Tensor) -> torch.Tensor:
        """W_P^T W_P for each unit's positions pos: [U, g] -> [U, g, g].

        The grouped-Cholesky cost tr(W_P B^-1 W_P^T) = sum(B^-1 * W_P^T W_P): a GEMM per unit instead of
        a batched triangular solve against a gathered copy of W. Units whose columns sit contiguously
        (heads stay contiguous under the compaction: a removed head's block is refilled by the last
        head's block, in order) are read in place.
        """
        g = pos.shape[1]
        starts = pos[:, 0].tolist()
        if bool((pos == pos[:, :1] + torch.arange(g, device=pos.device)).all()):
            views = [self._w[:, a:a + g] for a in starts]  # each [d_out, g], no copy
            return torch.stack([v.mT @ v for v in views])
        columns = self._w[:, pos.flatten()].view(-1, *pos.shape).transpose(0, 1)  # [U, d_out, g]
        return torch.bmm(columns.mT, columns)
