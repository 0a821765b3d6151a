"""Broadcasting a step's outcome from rank 0 with ``torch.distributed``: any picklable value whose tensors
(in dataclass fields, lists, tuples, dict values) travel as tensors, not pickles, or the error the step raised,
which every other rank then raises (the same class and message for a SlimGPTError).

Used by slimgpt.layerwise.distributed; the process group must exist.
"""

from __future__ import annotations

import copy
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


def _pack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with every tensor (in dataclass fields, lists, tuples, dict values) replaced by a _Slot."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1, tuple(value.shape), value.dtype, value.device.type == "cuda")
    if is_dataclass(value) and not isinstance(value, type):
        packed = copy.copy(value)
        for f in fields(value):
            object.__setattr__(packed, f.name, _pack(getattr(value, f.name), tensors))
        return packed
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _pack(v, tensors) for k, v in value.items()}
    return value


def _unpack(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    if is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            object.__setattr__(value, f.name, _unpack(getattr(value, f.name), tensors))
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _unpack(v, tensors) for k, v in value.items()}
    return value


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
    if isinstance(value, _Slot):
        slots.append(value)
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            _collect_slots(getattr(value, f.name), slots)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_slots(v, slots)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_slots(v, slots)
