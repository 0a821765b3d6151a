"""Which saved tensor of a sliced checkpoint moves with which residual basis (for the bits-back codec).

A sliced model (slimgpt.models.sliced) has 2L + 1 stream bases: basis 2l is layer l's input, 2l + 1 the
stream between its attention and its FFN, 2L the final one (the original basis at full width, read by the
final norm and lm_head: never rotated). Changing basis k by an orthogonal P keeps the network's function
when every reader of k becomes W P, every writer P^T W (and its bias P^T b), and the norm that reads k has a
constant weight (a weight-free RMS norm commutes with P; a fine-tuned, non-constant one does not, and that
basis stays fixed). A tensor touches at most two bases: ``reads`` (its columns) and ``writes`` (its rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from slimgpt.errors import SlimGPTError
from slimgpt.models.families import Family


class NotSlicedError(SlimGPTError):
    """The checkpoint is not one with rotational freedom (SliceGPT / dynamic slicing)."""


@dataclass(frozen=True)
class Move:
    """How one tensor moves: new = P_writes^T W P_reads (None: that side is fixed)."""

    reads: int | None = None
    writes: int | None = None

    def bases(self) -> list[int]:
        return [b for b in (self.reads, self.writes) if b is not None]


@dataclass
class Layout:
    """The free bases of a sliced checkpoint and how each tensor moves with them."""

    widths: list[int]  # width of every basis, 2L + 1 of them
    free: list[int]  # the bases that rotate freely, ascending
    moves: dict[str, Move] = field(default_factory=dict)

    def group(self, name: str) -> int:
        """The coding step of a tensor: its last free basis (-1: it moves with none)."""
        bases = [b for b in self.moves[name].bases() if b in self.free]
        return max(bases) if bases else -1

    def members(self, group: int) -> list[str]:
        return sorted(n for n in self.moves if self.group(n) == group)

    def designated(self, basis: int) -> list[tuple[str, bool]]:
        """The tensors that move with ``basis`` alone, as (name, is_writer): they fix its canonical frame."""
        out = []
        for name in sorted(self.moves):
            move = self.moves[name]
            if move.bases() == [basis] and name.endswith(".weight"):
                out.append((name, move.writes == basis))
        return out


def _constant(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.numel() > 0 and bool((weight == weight.reshape(-1)[0]).all())


def _layer_moves(prefix: str, row: Family, index: int, last: bool) -> dict[str, Move]:
    names, base = row.tensor_names, 2 * index
    out_basis = None if last else base + 2
    moves = {f"{prefix}{names[r]}.weight": Move(reads=base) for r in ("q", "k", "v")}
    moves.update({f"{prefix}{names[r]}.bias": Move() for r in ("q", "k", "v")})
    moves[f"{prefix}{names['o']}.weight"] = Move(writes=base + 1)
    moves[f"{prefix}{names['o']}.bias"] = Move(writes=base + 1)
    for role in row.ffn_input_roles:
        moves[f"{prefix}{names[role]}.weight"] = Move(reads=base + 1)
        moves[f"{prefix}{names[role]}.bias"] = Move()
    moves[f"{prefix}{names['down']}.weight"] = Move(writes=out_basis)
    moves[f"{prefix}{names['down']}.bias"] = Move(writes=out_basis)
    moves[f"{prefix}attn_shortcut.weight"] = Move(reads=base, writes=base + 1)
    moves[f"{prefix}mlp_shortcut.weight"] = Move(reads=base + 1, writes=out_basis)
    moves[f"{prefix}{names['attn_norm']}.weight"] = Move()
    moves[f"{prefix}{names['ffn_norm']}.weight"] = Move()
    return moves


def plan_layout(config: dict[str, Any], row: Family, tensors: dict[str, torch.Tensor],
                free_bases: list[int] | None = None) -> Layout:
    """The layout of a saved sliced checkpoint; NotSlicedError (one line) if it is not one.

    ``free_bases`` (the decoder: what the file's header says) replaces the check of the norms' weights.
    """
    dims = config.get("slice_dims")
    n_layers = int(config.get("num_hidden_layers", 0))
    if not dims or len(dims) != 2 * n_layers + 1:
        raise NotSlicedError("the checkpoint has no slice_dims in config.json: bits-back coding applies only to "
                             "models sliced by --method slicegpt or dynamic-slicing (rotation-invariant streams)")
    moves: dict[str, Move] = {}
    free = []
    for index in range(n_layers):
        prefix = row.layer_prefix.format(index)
        layer = _layer_moves(prefix, row, index, last=index == n_layers - 1)
        moves.update({name: move for name, move in layer.items() if name in tensors})
        for offset, role in ((0, "attn_norm"), (1, "ffn_norm")):
            if _constant(tensors.get(f"{prefix}{row.tensor_names[role]}.weight")):
                free.append(2 * index + offset)
    layer_prefix = row.layer_prefix.split("{}")[0]
    for name, tensor in tensors.items():
        if name in moves:
            continue
        if name.startswith(layer_prefix):
            raise NotSlicedError(f"{name} is not part of a sliced {row.label} layer: the folder was not written by "
                                 "slimgpt's SliceGPT / dynamic slicing; bits-back coding needs one that was")
        is_embedding = "embed" in name and tensor.dim() == 2 and tensor.shape[1] == int(dims[0])
        moves[name] = Move(reads=0) if is_embedding else Move()
    layout = Layout([int(d) for d in dims], free, moves)
    _check_shapes(layout, tensors)
    if free_bases is not None:
        layout.free = list(free_bases)
        return layout
    layout.free = [b for b in free if sum(_columns(tensors[n], w) for n, w in layout.designated(b)) >= layout.widths[b]]
    return layout


def _columns(tensor: torch.Tensor, writer: bool) -> int:
    return int(tensor.shape[1] if writer else tensor.shape[0])


def _check_shapes(layout: Layout, tensors: dict[str, torch.Tensor]) -> None:
    for name, move in layout.moves.items():
        shape = tensors[name].shape
        if move.reads is not None and (len(shape) != 2 or shape[1] != layout.widths[move.reads]):
            raise NotSlicedError(f"{name} has shape {tuple(shape)}, not the {layout.widths[move.reads]}-wide input "
                                 "that slice_dims says: the folder was edited or is not a sliced checkpoint")
        if move.writes is not None and shape[0] != layout.widths[move.writes]:
            raise NotSlicedError(f"{name} has shape {tuple(shape)}, not the {layout.widths[move.writes]}-wide "
                                 "output that slice_dims says: the folder was edited or is not a sliced checkpoint")
    for basis in layout.free:
        if not layout.designated(basis):
            raise NotSlicedError(f"stream basis {basis} has no tensor of its own to fix its frame: not a sliced "
                                 "checkpoint slimgpt can code")


def move_tensor(tensor: torch.Tensor, move: Move, bases: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` in the new bases (float64 maths, the tensor's dtype): P_w^T W P_r for the bases given."""
    if move.reads not in bases and move.writes not in bases:
        return tensor
    x = tensor.to(torch.float64)
    if move.writes in bases:
        x = bases[move.writes].T @ x
    if move.reads in bases:
        x = x @ bases[move.reads]
    return x.to(tensor.dtype)


def frame_matrix(layout: Layout, basis: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The basis's designated block matrix in writer form (width × n): moves as P^T X when the basis does."""
    parts = [tensors[name].to(torch.float64) if writer else tensors[name].to(torch.float64).T
             for name, writer in layout.designated(basis)]
    return torch.cat(parts, dim=1)
