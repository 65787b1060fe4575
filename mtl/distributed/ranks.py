"""Where this process stands in a multi-process run: rank, world size, main process, barriers,
sums over ranks and this rank's part of a batch. In one process (no process group) they answer as
for a world of one, so training code is the same loop either way."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a worker of a multi-process run (a process group with more than one member)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that validates, logs per-epoch results and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (``tensor`` itself in one process)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (``flag`` itself in one process).
    ``device``: where this rank's collectives run (a GPU under NCCL)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def shard(size: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of a batch of ``size`` items: parts differ by at most one item,
    and the parts of ranks 0..N-1 in order are the whole batch (numpy.array_split's rule).

    A part is empty when the batch has fewer items than ranks; the rank still takes part in the
    step's collectives.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(int(size), int(world))
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (rank_ < extra))
