"""torch.distributed glue: process group from torchrun's environment, and the few collectives fit needs.

Every helper is a no-op in a single process, so the training loop reads the same either way.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import DistributedError

__all__ = [
    "DistInfo",
    "init_distributed",
    "broadcast_object",
    "all_reduce_sum",
    "gather_objects",
    "sync_buffers",
    "wrap_ddp",
    "partition",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # this process's rank
    world_size: int = 1  # processes in the run
    local_rank: int = 0  # rank on this machine (picks the GPU)
    owns_group: bool = False  # fit created the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...), if any.

    Backend nccl on CUDA, gloo on CPU. `timeout_s` bounds every collective, so a rank that died
    makes the others fail with an error instead of hanging.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise DistributedError(
            f"joining the torch.distributed group failed ({exc}); launch with torchrun"
        ) from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _guard(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # gloo/nccl raise RuntimeError subclasses on a lost peer or timeout
        raise DistributedError(
            f"{what} failed on rank {dist.get_rank()}: another rank stopped or timed out ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); see that rank's log"
        ) from exc


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.active:
        return obj
    box = [obj]
    _guard("broadcast", dist.broadcast_object_list, box, 0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world_size
    _guard("all_gather", dist.all_gather_object, out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        _guard("all_reduce", dist.all_reduce, t)
    return t


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP syncs them before each
    forward, so the last step's update, and the buffers of modules it no longer wraps, differ."""
    if not info.active:
        return
    for b in model.buffers():
        _guard("broadcast", dist.broadcast, b, 0)


def barrier(info: DistInfo) -> None:
    if info.active:
        _guard("barrier", dist.barrier)


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the trainable module. Frozen parameters are outside it,
    so no `find_unused_parameters` is needed."""
    if not info.active:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # DDP syncs buffers (BatchNorm running stats) from rank 0 by default: ranks stay identical
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def partition(n: int, info: DistInfo) -> torch.Tensor:
    """This rank's fixed share of sample indices (rank, rank + W, ...), the same every epoch."""
    return torch.arange(info.rank, n, info.world_size)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
