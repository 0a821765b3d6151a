"""Pruning across processes with ``torch.distributed``: sharded calibration windows, summed statistics,
rank 0's decisions.

``torchrun --nproc-per-node N -m slimgpt prune ...`` and ``accelerate launch`` set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``launched`` joins that process group (nccl on CUDA, each rank
on ``cuda:LOCAL_RANK``; gloo on the CPU) with a timeout, so a rank that fails cannot leave the others
waiting forever. Inside ``joined`` (the drivers enter it; ``launched`` implies it):

- ``shard`` gives each rank a contiguous block of the calibration windows (``shard_bounds``: sizes differ
  by at most one, rank order), so every rank captures and propagates only its own windows;
- ``reduce_statistics`` turns each rank's running means into the mean over every rank's tokens (an
  all-reduce of the token-weighted sums), where a statistic is finished: the summed Hessians equal the
  single-process ones within float rounding;
- ``solve_on_main`` runs a method's decisions on rank 0 only and broadcasts them (kept units, compensated
  weights), so every rank applies identical weights and propagates its shard through the same layer;
- ``from_main`` runs one step (writing the output, a checkpoint) on rank 0 alone and hands every rank its
  result or its error; ``all_agree`` runs a step on every rank and fails on all of them if any fails or
  disagrees with rank 0 (resuming: every rank reads the same checkpoint);
- ``gather_windows`` collects the shards on rank 0 (CPU), for the checkpoint of the activations, which is
  therefore the same file a single process writes.

Without a process group of more than one rank every function here is the identity or a no-op, so the
single-process path does exactly what it did before.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slimgpt._util.collectives import portable, receive_outcome, send_outcome
from slimgpt.errors import ConfigError, DataError
from slimgpt.solver.hessian import InputStatistics

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # one collective may wait this long (rank 0's solve of a 70B FFN, a checkpoint)
_CHUNK_BYTES = 1 << 26  # activations travel in pieces of at most this size (64 MiB)


@dataclass(frozen=True)
class Group:
    """This process's place in the run: its rank, the number of ranks, where collectives run."""

    rank: int
    world_size: int
    device: torch.device  # the rank's CUDA device (nccl) or the CPU (gloo)


_GROUP: Group | None = None


def current() -> Group | None:
    """The run's group inside ``joined`` with more than one rank; None otherwise (a single process)."""
    return _GROUP


def rank() -> int:
    return _GROUP.rank if _GROUP is not None else 0


def world_size() -> int:
    return _GROUP.world_size if _GROUP is not None else 1


def is_main() -> bool:
    """Rank 0, the only rank that writes files (a single process is rank 0)."""
    return rank() == 0


def launch_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number: launch with torchrun or accelerate launch") from None


def check_launch_device(device: str, size: int) -> None:
    """With several ranks, ``--device`` is cuda (each rank takes cuda:LOCAL_RANK) or cpu."""
    if size <= 1:
        return
    parsed = torch.device(device)
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device} cannot run across processes: use cuda (nccl) or cpu (gloo)")
    if parsed.type == "cuda" and parsed.index is not None:
        raise ConfigError(f"--device {device} names one GPU for {size} ranks: pass --device cuda, and each rank "
                          "uses cuda:LOCAL_RANK")


@contextmanager
def launched(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Group | None]:
    """Join the process group a launcher describes (WORLD_SIZE > 1) for the block, then leave it.

    A process group that already exists is used as it is (and left alone afterwards).
    """
    size = launch_world_size()
    created = False
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        check_launch_device(device, size)
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (ValueError, RuntimeError) as error:
            raise ConfigError(f"cannot join the {size}-rank process group ({str(error).splitlines()[0]}): "
                              "launch with torchrun or accelerate launch (they set RANK, MASTER_ADDR, MASTER_PORT)"
                              ) from None
        created = True
    package_logger = logging.getLogger("slimgpt")
    level = package_logger.level
    try:
        with joined() as group:
            if group is not None and group.rank > 0:
                package_logger.setLevel(logging.WARNING)  # rank 0 logs for the run
            yield group
    finally:
        package_logger.setLevel(level)
        if created:
            dist.destroy_process_group()


@contextmanager
def joined() -> Iterator[Group | None]:
    """Within the block, run sharded when a process group of more than one rank exists (else: no-op)."""
    global _GROUP
    if _GROUP is not None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield _GROUP
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), device)
    try:
        yield _GROUP
    finally:
        _GROUP = None


# --- sharding ----------------------------------------------------------------------------------------------


def shard_bounds(n: int, world: int) -> list[slice]:
    """Contiguous blocks of ``n`` windows for ``world`` ranks, in rank order; sizes differ by at most one."""
    base, extra = divmod(n, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


def check_shardable(n: int) -> None:
    """Every rank needs at least one calibration window."""
    if n < world_size():
        raise DataError(f"{n} calibration windows cannot be shared by {world_size()} ranks: pass --nsamples "
                        f"{world_size()} or more, or launch fewer processes")


def own_rows(n: int) -> slice:
    """This rank's block of ``n`` windows (all of them in a single process)."""
    if _GROUP is None:
        return slice(0, n)
    check_shardable(n)
    return shard_bounds(n, _GROUP.world_size)[_GROUP.rank]


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``windows`` (dim 0); all of them in a single process."""
    if _GROUP is None:
        return windows
    check_shardable(windows.shape[0])
    return windows[shard_bounds(windows.shape[0], _GROUP.world_size)[_GROUP.rank]].clone()


# --- collectives -------------------------------------------------------------------------------------------


def _all_reduce_(tensor: torch.Tensor, group: Group) -> None:
    """Sum ``tensor`` over the ranks, in place."""
    buffer = tensor.to(group.device)
    dist.all_reduce(buffer)
    if buffer is not tensor:
        tensor.copy_(buffer)


def reduce_statistics(stats: InputStatistics) -> None:
    """Make ``stats`` the statistics of every rank's tokens (a no-op in a single process).

    Each rank keeps running means over its own tokens; weighting them by each rank's share of the tokens and
    summing gives the mean over all tokens, the single-process value up to float rounding.
    """
    group = _GROUP
    if group is None:
        return
    tokens = torch.tensor([float(stats.tokens)], dtype=torch.float64)
    _all_reduce_(tokens, group)
    total = int(tokens.item())
    if total:
        stats.second_moment.mul_(stats.tokens / total)
    _all_reduce_(stats.second_moment, group)
    _all_reduce_(stats.sum, group)
    stats.tokens = total


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable objects; the identity in a single process)."""
    group = _GROUP
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=group.device)
    return box[0]


def from_main(step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 alone; every rank returns its result (tensors included) or raises its error.

    In a single process: ``step()``.
    """
    group = _GROUP
    if group is None:
        return step()
    if group.rank != 0:
        result: T = receive_outcome(group.device)
        return result
    try:
        result = step()
    except BaseException as error:
        send_outcome(None, error, group.device)
        raise
    send_outcome(result, None, group.device)
    return result


def solve_on_main(method: T, hooks: tuple[str, ...]) -> T:
    """A shallow copy of ``method`` whose ``hooks`` (e.g. ``prune_attention``) run on rank 0 only; the other
    ranks get rank 0's result (the decision: removed units, compensated weights). ``method`` itself is
    unchanged; in a single process it is returned as it is."""
    if _GROUP is None:
        return method
    clone = copy.copy(method)
    for name in hooks:
        bound = getattr(clone, name)
        setattr(clone, name, _on_main_call(bound))
    return clone


def _on_main_call(function: Callable[..., T]) -> Callable[..., T]:
    def call(*args: Any, **kwargs: Any) -> T:
        return from_main(lambda: function(*args, **kwargs))

    return call


def all_agree(step: Callable[[], T], key: Callable[[T], Any], what: str) -> T:
    """Run ``step`` on every rank; if it fails on any rank, every rank raises that error, and if ``key`` of
    a rank's result differs from rank 0's, every rank refuses (``what`` names the thing they disagree on)."""
    group = _GROUP
    if group is None:
        return step()
    result: T | None = None
    try:
        result = step()
        outcome: tuple[Any, ...] = ("ok", key(result))
    except Exception as error:  # every rank learns of it before anyone waits for a collective
        outcome = ("error", *portable(error))
        local: Exception | None = error
    else:
        local = None
    outcomes: list[Any] = [None] * group.world_size
    dist.all_gather_object(outcomes, outcome)
    for r, other in enumerate(outcomes):
        if other[0] == "error":
            if local is not None:
                raise local
            raise other[1](f"{other[2]} (on rank {r})")
    if any(other[1] != outcomes[0][1] for other in outcomes):
        raise ConfigError(f"the {group.world_size} ranks disagree on {what}: give every rank the same files "
                          "(a folder every rank reads)")
    assert result is not None
    return result


def gather_windows(local: torch.Tensor, total: int) -> torch.Tensor | None:
    """Every rank's block of windows (dim 0) in rank order, on rank 0's CPU; None on the other ranks.

    In a single process: ``local`` itself.
    """
    group = _GROUP
    if group is None:
        return local
    bounds = shard_bounds(total, group.world_size)
    per_window = max(1, local[:1].numel() * local.element_size())
    step = max(1, _CHUNK_BYTES // per_window)
    if group.rank != 0:
        for start in range(0, local.shape[0], step):
            dist.send(local[start:start + step].to(group.device).contiguous(), dst=0)
        return None
    full = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    full[bounds[0]] = local.cpu()
    for r in range(1, group.world_size):
        for start in range(bounds[r].start, bounds[r].stop, step):
            stop = min(start + step, bounds[r].stop)
            buffer = torch.empty((stop - start, *local.shape[1:]), dtype=local.dtype, device=group.device)
            dist.recv(buffer, src=r)
            full[start:stop] = buffer.cpu()
    return full


def describe(n: int) -> str:
    """The log line of a sharded run: ranks and windows per rank."""
    sizes = [b.stop - b.start for b in shard_bounds(n, world_size())]
    return f"{world_size()} ranks share {n} calibration windows: {sizes} per rank (contiguous blocks)"
