"""The fast exact solver: one factorisation, then rank-|P| Schur-complement downdates kept as factors.

Removing a set P from the surviving columns S (R = S minus P) changes the inverse Hessian over the
survivors to its Schur complement, which is exactly the inverse of H_RR:

    (H_RR)^-1 = Hinv_RR - Hinv_RP Hinv_PP^-1 Hinv_PR = (Hinv - F^T F)_RR,   F = L_P^-1 Hinv_P,

with Hinv_PP = L_P L_P^T, and compensates the surviving weights with the OBS block update
W_R -= W_P Hinv_PP^-1 Hinv_PR = (W_P L_P^-T) F. So after any rounds

    Hinv (over the survivors) = M^T M - C^T C,   M = L^-1 for H = L L^T,   C = [F_1; F_2; ...],

and a round needs only the rows Hinv_P (a p x d product, p = |P|) and, for scoring, the diagonal or
the diagonal blocks, which are kept up to date at O(d p) a round. No d x d matrix is downdated,
masked or symmetrised per round: the work is O(d^2 p) in three GEMMs, against the reference's fresh
O(d^3) inversion. When more than a third of the columns is to go as scattered channels
(``expect_removals``), K = M^T M (the initial inverse) is formed once, n^3 / 3 flops, and replaces M:
the rows are then a row gather of K minus the C terms, instead of a triangular product with M a round.

With few rounds (heads of 128 columns, 2-4 rounds) the one factorisation is a large share, so it
runs in GEMMs that skip the triangular factors' zero blocks (linalg.inverse_cholesky_factor, about
2/3 d^3 flops, the least that yields every diagonal block of Hinv the first round's exact scores
need), and so do the rows (M[s:, s:] is triangular) and the heads' small block inverses
(linalg.batched_inverse_factor instead of LAPACK's batched potrf/potri). The weight, M and C have
padded rows (linalg.padded_empty: a head's column slab at a 4 or 8 KiB row stride thrashes the caches);
a head's rows, F and the weight update cover only the surviving columns; C is sized once from the
rounds' hint (``expect_removals``).
"""

from __future__ import annotations

import math

import torch

from slimgpt.solver.base import Solver
from slimgpt.solver.linalg import (
    INVERSE_BLOCK,
    batched_inverse_factor,
    block_scores,
    gram_of_lower,
    inverse_cholesky_factor,
    mirror_lower,
    padded_empty,
    times_lower,
)

# The weight update skips removed columns while they form at most this many ranges (heads), not else (FFN).
MAX_RUNS = 16
# Scattered columns take their rows from K = Hinv (formed once, n^3 / 3 flops) instead of from M (about
# n^2 flops a column) when more than this fraction of the columns is to go (measured: 12-15% faster on
# down_proj 1024 x 2752 at 50%, 2-4% slower on 2048 x 5504 at 20%; docs/benchmarks.md section 1).
ROWS_FROM_INVERSE = 1 / 3


def _contiguous_starts(units: torch.Tensor) -> list[int] | None:
    """Start of each unit if every unit's columns are consecutive (heads are), else None."""
    g = units.shape[1]
    if bool((units == units[:, :1] + torch.arange(g, device=units.device)).all()):
        return [int(a) for a in units[:, 0].tolist()]
    return None


def _adjacent(starts: list[int], g: int) -> list[tuple[int, int]]:
    """Ranges [i, j) of units that lie side by side (unit i + 1 starts where unit i ends), in order."""
    runs: list[list[int]] = []
    for i, a in enumerate(starts):
        if runs and a == starts[i - 1] + g:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(i, j) for i, j in runs]


def _unit_views(matrix: torch.Tensor, start: int, count: int, g: int) -> torch.Tensor:
    """The columns of ``count`` side-by-side units from ``start`` as a batch [count, rows, g], in place."""
    return matrix[:, start:start + count * g].unflatten(1, (count, g)).transpose(0, 1)


class FastSolver(Solver):
    """Exact downdates of Hinv instead of re-inversion (docs/paper.md section 6), as low-rank factors.

    State: ``_w`` the compensated full weight (removed columns zero), ``_M`` = L^-1 (lower triangular;
    replaced by ``_K`` = M^T M when scattered columns are first asked for),
    ``_C`` the stacked downdate factors ([T, d], T columns removed so far), ``_diag`` = diag(Hinv) over
    the survivors (formed on the first ``channel_errors``: the head rounds never need it), and per
    units tensor the cached diagonal blocks Hinv[u, u].
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> None:
        super().__init__(weight, hessian, compensate)
        d = weight.shape[1]
        self._w = padded_empty(weight.shape[0], d, self.dtype, weight.device)  # [d_out, d], rows padded
        self._w.copy_(weight)
        self._M: torch.Tensor | None = inverse_cholesky_factor(hessian.to(self.dtype))  # [d, d], Hinv = M^T M
        self._K: torch.Tensor | None = None  # Hinv = M^T M itself, formed (and M dropped) for scattered columns
        self._use_inverse = False  # whether scattered columns form K (expect_removals)
        self._C = self._w.new_empty(0, d)  # [T, d] downdate factors (capacity grows by doubling)
        self._T = 0
        self._diag: torch.Tensor | None = None  # diag(Hinv), formed on first use (FFN rounds only)
        self._pruned = torch.zeros(d, dtype=torch.bool, device=weight.device)
        # (units, their starts if contiguous, blocks, T folded in)
        self._blocks: tuple[torch.Tensor, list[int] | None, torch.Tensor, int] | None = None
        self._scored: dict[int, torch.Tensor] = {}  # first column -> L^-1 of its unit's block, at the last scores

    @property
    def weight(self) -> torch.Tensor:
        return self._w

    @property
    def pruned(self) -> torch.Tensor:
        return self._pruned

    def _factor(self) -> torch.Tensor:
        """M = L^-1 (the head rounds' state until scattered columns are first asked for)."""
        assert self._M is not None
        return self._M

    def expect_removals(self, columns: int, units: bool = False) -> None:
        """Scattered columns: form K when many are to go (ROWS_FROM_INVERSE). Either way the downdate
        factors get room for them now (no buffer grown and copied a round)."""
        if not units and self._T + columns > ROWS_FROM_INVERSE * self._w.shape[1]:
            self._use_inverse = True
        self._reserve(max(0, min(columns, self._w.shape[1] - self._T)))

    def _initial_inverse(self) -> torch.Tensor:
        """K = M^T M, the inverse Hessian before any removal, formed once and kept instead of M.

        Scattered columns (FFN channels, many rounds) then take their rows Hinv[P, :] as one row gather of
        K a round instead of a triangular product with M: n^3 / 3 flops once (linalg.gram_of_lower), and
        diag(Hinv) is K's diagonal. Head rounds (few, each one head of consecutive columns) keep M: their
        rows and blocks from M cost less than forming K, and so do scattered columns when fewer than a
        third of them are to go (``expect_removals``)."""
        if self._K is None:
            self._K = gram_of_lower(self._factor())
            mirror_lower(self._K)
            self._M = None
        return self._K

    def inverse(self) -> torch.Tensor:
        """Full-size inverse over the survivors, removed columns decoupled (for tests: O(d^3))."""
        C = self._C[:self._T]
        full = (self._K if self._K is not None else self._factor().mT @ self._factor()) - C.mT @ C
        full[self._pruned, :] = 0
        full[:, self._pruned] = 0
        full[self._pruned, self._pruned] = 1
        return full

    def _rows(self, columns: torch.Tensor, start: int | None) -> torch.Tensor:
        """Hinv[P, :] over the survivors ([p, d], zero at removed columns); ``columns`` sorted.

        From M (lower triangular, so column j of M is zero above row j): (M^T M)[P, :] needs only M's
        rows from min(P) on, in a product whose triangular part skips its zero blocks; a head
        (``start``: its first column, the columns consecutive) is one slice, scattered columns go in
        chunks. Or, once K is formed (``_initial_inverse``), a row gather of K.
        """
        if self._M is not None and (start is not None or not self._use_inverse):
            M = self._M
            rows = M.new_empty(len(columns), M.shape[1])
            if start is not None:
                self._rows_from(start, M[start:, start:start + len(columns)].mT, rows)
            else:  # in chunks, each from its own first row: half the work of one product from row min(P)
                done = 0
                for chunk in columns.tensor_split(max(1, min(8, len(columns) // 32))):
                    c = int(chunk[0])
                    self._rows_from(c, M[c:, chunk].mT, rows[done:done + len(chunk)])
                    done += len(chunk)
        else:
            rows = self._initial_inverse().index_select(0, columns)
        if self._T:
            C = self._C[:self._T]
            C_P = C[:, start:start + len(columns)] if start is not None else C[:, columns]
            rows.addmm_(C_P.mT, C, alpha=-1)  # minus (C^T C)[P, :]
            rows.masked_fill_(self._pruned, 0)  # removed columns are decoupled
        return rows

    def _unit_rows(self, s: int, p: int, runs: list[tuple[int, int]]) -> torch.Tensor:
        """Hinv[P, :] for consecutive columns P = [s, s + p) from M, on the surviving columns only (``runs``,
        which include P; what lies between them is left unset): the later head rounds skip the removed
        heads' columns, a quarter to a third of the product at 3-4 rounds of 8 heads."""
        M = self._factor()
        rows = M.new_empty(p, M.shape[1])
        C = self._C[:self._T]
        for a, b in runs:
            if a < s:  # left of the head: M[s:, a:c] is a full block
                c = min(b, s)
                rows[:, a:c].addmm_(M[s:, s:s + p].mT, M[s:, a:c], beta=0)
            if b > s:  # right of (or at) the head: M[a1:, a1:b] is lower trapezoidal, zero above row a1
                a1 = max(a, s)
                X = M[a1:, s:s + p].mT  # [p, d - a1]: M's rows from a1 on (the column block P is zero above s)
                times_lower(X[:, :b - a1], M[a1:b, a1:b], rows[:, a1:b], INVERSE_BLOCK)
                if b < M.shape[0]:
                    rows[:, a1:b].addmm_(X[:, b - a1:], M[b:, a1:b])
            if self._T:
                rows[:, a:b].addmm_(C[:, s:s + p].mT, C[:, a:b], alpha=-1)  # minus (C^T C)[P, a:b]
        return rows

    def _rows_from(self, s: int, M_P: torch.Tensor, out: torch.Tensor) -> None:
        """out = (M^T M)[P_c, :] from M_P = M[s:, P_c]^T, the columns P_c >= s (M is zero above row s there)."""
        M = self._factor()
        if s:
            out[:, :s].addmm_(M_P, M[s:, :s], beta=0)
        times_lower(M_P, M[s:, s:], out[:, s:], INVERSE_BLOCK)  # M[s:, s:] is lower triangular

    def _reserve(self, p: int) -> torch.Tensor:
        """The next p rows of the stacked factors C ([p, d]), doubling the buffer when full."""
        need = self._T + p
        if need > self._C.shape[0]:
            C = self._C
            grown = padded_empty(max(need, 2 * C.shape[0]), C.shape[1], C.dtype, C.device)
            grown[:self._T] = self._C[:self._T]
            self._C = grown
        return self._C[self._T:need]

    def _live_runs(self) -> list[tuple[int, int]]:
        """Maximal ranges [a, b) of surviving columns (the weight update skips the removed ones)."""
        edges = torch.diff(self._pruned.to(torch.int8), prepend=self._pruned.new_ones(1).to(torch.int8),
                           append=self._pruned.new_ones(1).to(torch.int8)).nonzero().flatten().tolist()
        return list(zip(edges[::2], edges[1::2], strict=True))

    def remove(self, columns: torch.Tensor) -> None:
        columns = columns.to(self._pruned.device).sort().values  # the set matters, not its order
        if columns.numel() == 0:
            return
        if bool(self._pruned[columns].any()) or bool((columns[1:] == columns[:-1]).any()):
            raise ValueError("a column is already removed (or given twice); each column can go once")
        found = _contiguous_starts(columns[None])
        start = found[0] if found is not None else None
        N, F = self._new_factor(columns, start)
        self._pruned[columns] = True
        if self.compensate:
            W_P = self._w[:, start:start + len(columns)] if start is not None else self._w[:, columns]
            W_P = W_P @ N.mT  # W_P L_P^-T
            runs = self._live_runs()  # OBS block update of the survivors (F is zero on removed columns)
            for a, b in runs if len(runs) <= MAX_RUNS else [(0, self._w.shape[1])]:  # (heads: few runs)
                self._w[:, a:b].addmm_(W_P, F[:, a:b], alpha=-1)
        if start is not None:
            self._w[:, start:start + len(columns)] = 0
        else:
            self._w[:, columns] = 0
        self._T += len(columns)
        if self._diag is not None:
            self._diag -= F.square().sum(0)  # diag(F^T F)

    def _new_factor(self, columns: torch.Tensor, start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """N = L_P^-1 (Hinv_PP = L_P L_P^T, p x p, explicit so that the products with it are GEMMs) and
        F = N Hinv_P, the next p rows of C, for the columns P about to go. A head (``start``) with M at hand
        takes its rows on the surviving columns only (``_unit_rows``), and F is zero on the removed ones,
        as the masked rows of ``_rows`` give."""
        p = len(columns)
        runs = self._live_runs() if start is not None and self._M is not None else []  # P among them
        runs = runs if len(runs) <= MAX_RUNS else []
        rows = self._unit_rows(start, p, runs) if start is not None and runs else self._rows(columns, start)
        rows_P = rows[:, start:start + p] if start is not None else rows[:, columns]
        N = self._scored.get(start) if start is not None else None  # the last scores' own (same T)
        if N is None or N.shape[0] != p:
            N = inverse_cholesky_factor(rows_P) if p > 2 * INVERSE_BLOCK else \
                batched_inverse_factor(rows_P[None])[0]
        self._scored = {}
        F = self._reserve(p)  # [p, d]
        if runs:
            F.zero_()
            for a, b in runs:
                F[:, a:b].addmm_(N, rows[:, a:b], beta=0)
        else:
            torch.mm(N, rows, out=F)
        return N, F

    def channel_errors(self) -> torch.Tensor:
        if self._diag is None:  # diag(K - C^T C); square().sum(0) reads rows, unlike a column norm
            K = self._initial_inverse() if self._use_inverse or self._K is not None else None
            self._diag = (K.diagonal() if K is not None else self._factor().square().sum(0)) - \
                self._C[:self._T].square().sum(0)
        errors = self._w.square().sum(0) / self._diag
        errors[self._pruned] = math.inf
        return errors

    def _unit_blocks(self, units: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """Hinv[u, u] for every unit ([n_units, g, g]), cached and brought up to date with new factors; and
        each unit's first column if all are contiguous (``_contiguous_starts``, cached with them)."""
        cached = self._blocks
        if cached is not None and cached[0].shape == units.shape and torch.equal(cached[0], units):
            starts, blocks, folded = cached[1], cached[2], cached[3]
        else:
            starts = _contiguous_starts(units)
            g = units.shape[1]
            if self._M is None:
                blocks = self._initial_inverse()[units[:, :, None], units[:, None, :]]
            else:
                M = self._M
                slabs = [M[a:, a:a + g] for a in starts] if starts is not None else \
                    [M[int(u.min()):, u] for u in units]  # each [rows, g]: M's nonzero part of M[:, u]
                blocks = torch.stack([s.mT @ s for s in slabs])
            folded = 0
        if folded < self._T:
            self._fold(units, starts, blocks, self._C[folded:self._T])
        self._blocks = (units.clone(), starts, blocks, self._T)
        return blocks, starts

    @staticmethod
    def _fold(units: torch.Tensor, starts: list[int] | None, blocks: torch.Tensor, new: torch.Tensor) -> None:
        """blocks[u] -= new[:, u]^T new[:, u] (the factors added since the blocks were last brought up to date);
        side-by-side units read ``new`` in place, one batched GEMM a run, others through a gather."""
        if starts is None:
            gathered = new[:, units]  # [t, n_units, g]
            blocks -= torch.einsum("tug,tuh->ugh", gathered, gathered)
            return
        g = units.shape[1]
        for i, j in _adjacent(starts, g):
            view = _unit_views(new, starts[i], j - i, g)  # [j - i, t, g]
            blocks[i:j].baddbmm_(view.mT, view, alpha=-1)

    def unit_scores(self, units: torch.Tensor, alive: torch.Tensor, mode: str) -> torch.Tensor:
        units = units.to(self._pruned.device)
        blocks, starts = self._unit_blocks(units)  # [n_units, g, g]
        # Units with a removed column cannot go again, whatever ``alive`` says.
        live = (alive & ~self._pruned[units].any(1).cpu()).nonzero().flatten()
        scores = torch.full((len(units),), math.inf, dtype=self.dtype)
        if len(live) == 0:
            return scores
        live_units, live_blocks = units[live.to(units.device)], blocks[live.to(units.device)]
        if mode != "gcd":
            columns = self._w[:, live_units].permute(1, 2, 0)  # [U, g, d_out]
            scores[live] = block_scores(live_blocks, columns, mode).cpu()
            return scores
        # tr(W_P B^-1 W_P^T) = tr(N W_P^T W_P N^T) with B = L L^T, N = L^-1: the Grams come from W in
        # place (heads are contiguous), and N from GEMMs instead of LAPACK's small potrf/potri.
        N = batched_inverse_factor(live_blocks)  # [U, g, g]
        if starts is not None:  # a removal right after these scores reuses its unit's N (the same Hinv_PP)
            self._scored = {starts[i]: N[k] for k, i in enumerate(live.tolist())}
        live_starts = None if starts is None else [starts[i] for i in live.tolist()]
        scores[live] = (N * (N @ self._grams(live_units, live_starts))).sum((1, 2)).cpu()
        return scores

    def _grams(self, units: torch.Tensor, starts: list[int] | None) -> torch.Tensor:
        """W_u^T W_u for each unit ([U, g, g]): one batched GEMM per run of adjacent heads (``starts``: each
        unit's first column, the units contiguous), read in place."""
        g = units.shape[1]
        if starts is None:
            return torch.stack([self._w[:, u].mT @ self._w[:, u] for u in units])
        views = [_unit_views(self._w, starts[i], j - i, g) for i, j in _adjacent(starts, g)]  # [r, d_out, g]
        grams = [view.mT @ view for view in views]
        return grams[0] if len(grams) == 1 else torch.cat(grams)
