"""Broadcasting a step's outcome from rank 0 with ``torch.distributed``: any picklable value whose tensors
(in dataclass fields, lists, tuples, dict values) travel as tensors, not pickles, or the error the step raised,
which every other rank then raises (the same class and message for a SlimGPTError).

Used by slimgpt.layerwise.distributed; the process group must exist.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
import torch.distributed as dist

from slimgpt.errors import SlimGPTError


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a broadcast object: its shape, dtype and whether it lived on a GPU."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    cuda: bool


def _tree_map(value: Any, is_leaf: Callable[[Any], bool], leaf: Callable[[Any], Any]) -> Any:
    """``value`` with every leaf (in dataclass fields, lists, tuples, dict values) replaced by ``leaf(it)``;
    the containers are copied, never changed in place."""
    if is_leaf(value):
        return leaf(value)
    if is_dataclass(value) and not isinstance(value, type):
        mapped = copy.copy(value)
        for f in fields(value):
            object.__setattr__(mapped, f.name, _tree_map(getattr(value, f.name), is_leaf, leaf))
        return mapped
    if isinstance(value, (list, tuple)):
        return type(value)(_tree_map(v, is_leaf, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _tree_map(v, is_leaf, leaf) for k, v in value.items()}
    return value


def _pack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by a _Slot; the tensors are appended to ``tensors``."""

    def slot(tensor: torch.Tensor) -> _Slot:
        tensors.append(tensor)
        return _Slot(len(tensors) - 1, tuple(tensor.shape), tensor.dtype, tensor.device.type == "cuda")

    return _tree_map(value, lambda v: isinstance(v, torch.Tensor), slot)


def _unpack(value: Any, tensors: list[torch.Tensor]) -> Any:
    return _tree_map(value, lambda v: isinstance(v, _Slot), lambda v: tensors[v.index])


def portable(error: BaseException) -> tuple[type[Exception], str]:
    """An error as the other ranks raise it: the same class and message for a SlimGPTError."""
    if isinstance(error, SlimGPTError):
        return type(error), str(error)
    return RuntimeError, f"rank 0 failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def send_outcome(outcome: Any, error: BaseException | None, device: torch.device) -> None:
    """Broadcast (from rank 0) ``outcome`` with its tensors, or ``error`` as the other ranks raise it."""
    tensors: list[torch.Tensor] = []
    packed = None if error is not None else _pack(outcome, tensors)
    dist.broadcast_object_list([(packed, portable(error) if error is not None else None)], src=0,
                               device=device)
    for tensor in tensors:
        buffer = tensor.detach().to(device).contiguous()
        dist.broadcast(buffer, src=0)


def receive_outcome(device: torch.device) -> Any:
    """What rank 0's ``send_outcome`` sent: the outcome (tensors on ``device``, or the CPU where they were),
    or its error, raised."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, device=device)
    packed, failure = box[0]
    if failure is not None:
        kind, message = failure
        raise kind(message)
    slots: list[_Slot] = []
    _collect_slots(packed, slots)
    tensors: list[torch.Tensor] = []
    for slot in sorted(slots, key=lambda s: s.index):
        buffer = torch.empty(slot.shape, dtype=slot.dtype, device=device)
        dist.broadcast(buffer, src=0)
        tensors.append(buffer if slot.cuda else buffer.cpu())
    return _unpack(packed, tensors)


def _collect_slots(value: Any, slots: list[_Slot]) -> None:
    _tree_map(value, lambda v: isinstance(v, _Slot), slots.append)
