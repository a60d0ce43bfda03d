"""One Dropper, set up in one place: what every driver (`fit`, an update, the Lightning callback, a
loop of your own) needs before its first step.

`set_up` decides how this process takes part in a run: how it makes batches, its share of the
samples (one rank of several under torchrun), its optimizer steps per epoch, and where its caches
live (the run folder's `cache/`, the user's `cache_dir`, or a temporary folder removed when the
Dropper closes). Every driver builds its Dropper on it:

    dropper = Dropper(model, data, cfg, policy, set_up(model, data, cfg, device, info), emit)

and `Dropper.create` does both for a loop of your own.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from ..cache import CacheStore
from ..config import FitConfig
from ..errors import FxdropError
from ..graph import frozen_modules
from .feeds import Batching

__all__ = ["Setup", "set_up", "batching", "frozen_at_start"]


@dataclass(frozen=True)
class Setup:
    """How this process takes part in a run."""

    batching: Batching  # how it makes batches
    info: D.DistInfo  # its place in the process group
    indices: dict[str, torch.Tensor]  # per split, the dataset indices it trains and validates on
    steps_per_epoch: int  # its optimizer steps per epoch
    store: CacheStore  # where its caches live
    tmp: tempfile.TemporaryDirectory | None  # the cache folder when none was named; goes at close


def batching(cfg: FitConfig, device: torch.device, world_size: int) -> Batching:
    """The batches of one process: the global batch shared by `world_size` ranks; AMP and
    channels-last as `cfg` says, on with CUDA when it leaves the choice."""
    on_cuda = device.type == "cuda"
    amp = cfg.amp if cfg.amp is not None else on_cuda
    channels_last = cfg.channels_last if cfg.channels_last is not None else on_cuda
    return Batching(device, max(1, cfg.batch_size // world_size), amp, channels_last, cfg.num_workers)


def set_up(
    model: nn.Module,
    data: dict[str, Dataset],
    cfg: FitConfig,
    device: torch.device,
    info: D.DistInfo,
    *,
    out_dir: str | Path | None = None,
    train_positions: torch.Tensor | None = None,
) -> Setup:
    """Move `model` to `device` (channels-last when the batching is) and decide this process's
    part in the run.

    Args:
        model: the model to train.
        data: `{"train": Dataset, "val": Dataset}`.
        cfg: the run's settings (batch size, batches per optimizer step, AMP, channels-last,
            workers, cache folder).
        device: where this process trains; info: its place in the process group.
        out_dir: the run folder, whose `cache/` holds the caches unless `cfg.cache_dir` names one;
            None and no `cache_dir`: a temporary folder.
        train_positions: the training set's indices to train on (an update that replays only the
            new samples); None: all of them.
    """
    b = batching(cfg, device, info.world_size)
    model.to(device)
    if b.channels_last:
        model.to(memory_format=torch.channels_last)
    indices = {split: D.partition(len(ds), info) for split, ds in data.items()}
    if train_positions is not None:
        indices["train"] = train_positions[D.partition(len(train_positions), info)]
    if len(indices["train"]) == 0:
        raise FxdropError(
            f"{len(data['train'])} training samples cannot be shared by {info.world_size} processes"
        )
    batches = math.ceil(len(indices["train"]) / b.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.grad_accum_steps)  # optimizer steps
    tmp = None if (cfg.cache_dir or out_dir) else tempfile.TemporaryDirectory(prefix="fxdrop-cache-")
    root = cfg.cache_dir or (Path(out_dir) / "cache" if out_dir else tmp.name)
    # a folder the user named stays when empty; the run's `cache/` and a temporary one go
    store = CacheStore(root, "fp32", info.rank, info.world_size, owns_root=None if cfg.cache_dir else True)
    return Setup(b, info, indices, steps_per_epoch, store, tmp)


def frozen_at_start(model: nn.Module) -> list[str]:
    """The modules whose parameters the model came with frozen (`requires_grad=False`), said in
    one warning: a fit trains the model as it is handed over, and what is frozen stays frozen."""
    frozen = frozen_modules(model)
    if frozen:
        warnings.warn(
            f"fit: parameters of {', '.join(frozen[:6])}{' ...' if len(frozen) > 6 else ''} have "
            "requires_grad=False and will not train; after DropGraph.split, call dg.unsplit() to "
            "train the whole model",
            stacklevel=6,  # the line that called `fit` (fit, fit_checked, execute, _Run)
        )
    return frozen
