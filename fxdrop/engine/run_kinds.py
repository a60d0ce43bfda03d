"""How a run starts and what it writes: the two things a fit and an update differ by.

The loop (`loop._Run`) is the same for both. A `Start` opens the run folder, begins the run (or
finds the checkpoint it resumes from); a `Writes` writes config.json, the checkpoints, the metrics
and the best epoch's weights. A fit's are here (`FitStart`, `FitWrites`); an update's are in
update_run.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from .. import distributed as D
from ..records import Metrics, NoResume, RunConfig, UpdateEntry
from ..runs import RunDir

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from ..cache import CacheStore
    from ..config import FitConfig
    from ..policies import Policy
    from ..records import Emit, Epoch
    from .dropper import Dropper
    from .feeds import Batching
    from .result import FitResult

__all__ = ["RunState", "Start", "Writes", "FitStart", "FitWrites", "identity", "metrics_of"]


class RunState(Protocol):
    """What a `Start` and a `Writes` read and set of the run they serve (`loop._Run` is one): the
    loop holds them, so they know it by this protocol, not by its class."""

    out_dir: Path | None  # None: no run folder
    model: nn.Module
    cfg: FitConfig
    policy: Policy
    info: D.DistInfo
    emit: Emit
    b: Batching
    store: CacheStore
    steps_per_epoch: int  # optimizer steps
    frozen_at_start: list[str]
    opt: torch.optim.Optimizer
    dropper: Dropper
    history: list[Epoch]
    run_dir: RunDir | None
    best_state: dict[str, torch.Tensor] | None


class Start(Protocol):
    """How a run starts."""

    train_positions: torch.Tensor | None  # the training set's indices to train on; None: all

    def open(self, run: RunState, resume: bool, overwrite: bool) -> tuple[RunDir | None, bool]:
        """The run folder (None: none, or not the main process) and whether the run resumes."""
        ...

    def begin(self, run: RunState) -> None:
        """Start the run from its first step (not resuming)."""
        ...

    def load(self, run_dir: RunDir) -> dict[str, Any]:
        """The checkpoint a resumed run continues from."""
        ...

    def restored(self, ck: dict[str, Any]) -> None:
        """The run continued from `ck`: what the start itself keeps in it."""
        ...


class Writes(Protocol):
    """What a run writes in its folder."""

    keeps_best: bool  # the best epoch's weights are kept (model-best.safetensors)

    def config(self, run: RunState) -> None:
        """config.json, when what the run uses changed since it was last written."""
        ...

    def epoch_end(self, run: RunState) -> None:
        """An epoch ended (before its checkpoint): what the run writes of it."""
        ...

    def checkpoint(self, run_dir: RunDir, state: dict[str, Any]) -> int:
        """Write the checkpoint `state`; returns its bytes."""
        ...

    def metrics(self, run: RunState, metrics: Metrics) -> UpdateEntry | None:
        """The run is over: its metrics (and an update's entry, returned)."""
        ...


def identity(run: RunState) -> dict[str, Any]:
    """What makes two runs the same run (a resumed run may change epochs, device, workers)."""
    full = {"policy": run.policy.describe()} | run.cfg.to_dict() | run.cfg.extra
    keys = ("policy", "seed", "batch_size", "optimizer", "lr", "cache", "cache_views", "cache_dtype")
    return {k: full.get(k) for k in (*keys, "model", "data")}


def metrics_of(run: RunState, result: FitResult) -> Metrics:
    """What a run writes to metrics.json at its end (an update's entry is made from it too)."""
    dropper = run.dropper
    return Metrics(
        epochs=list(result.history),
        events=list(dropper.events),
        total_seconds=result.total_seconds,
        final_val_acc=result.final_val_acc,
        best_epoch=result.best_epoch,
        best_val_acc=result.best_val_acc,
        stopped_early=result.stopped_early,
        cache_bytes=result.cache_bytes,
        world_size=run.info.world_size,
        declined_drops=list(dropper.records.declined),
        steps_per_epoch=run.steps_per_epoch,
        forward_flops_fraction=result.forward_flops_fraction,
        train_flops_fraction=result.train_flops_fraction,
        checkpoint_bytes=result.checkpoint_bytes,
        no_drop=result.no_drop,
        decide_seconds=dropper.records.decide_seconds(),
        cache_build_seconds=dropper.records.cache_build_seconds(),
        cache_builds=list(dropper.records.cache_builds),
        cache_rebuilds=list(dropper.records.cache_rebuilds),
        val_at_chance=dropper.records.val_at_chance,
        frozen_at_start=run.frozen_at_start,
        landings=list(dropper.records.landings),
        step_costs=dropper.choice.to_dict(),
        policy=run.policy.describe() | {"observations": dropper.policy_observations()},
    )


class FitStart:
    """A fit starts from scratch, or resumes from its last finished epoch's checkpoint."""

    train_positions = None

    def open(self, run: RunState, resume: bool, overwrite: bool) -> tuple[RunDir | None, bool]:
        run_dir = None
        if run.out_dir and run.info.is_main:
            # only now, with the model traced and the policy's cuts valid, may `overwrite` delete a run
            run_dir = RunDir(run.out_dir, identity(run), resume, overwrite, run.store)
        resuming = D.broadcast_object(run_dir.resuming if run_dir else False, run.info)
        if resume and not resuming:
            run.emit(NoResume(f"no finished epoch to resume in '{run.out_dir}': starting from scratch"))
        return run_dir, resuming

    def begin(self, run: RunState) -> None:
        run.dropper.begin()

    def load(self, run_dir: RunDir) -> dict[str, Any]:
        return run_dir.load_checkpoint()

    def restored(self, ck: dict[str, Any]) -> None:
        """Nothing of its own."""


class FitWrites:
    """A fit writes config.json (rewritten when a drop chose a cache format), summary.csv,
    checkpoint.pt, metrics.json, the samples it trained on, and model-best.safetensors."""

    keeps_best = True

    def __init__(self) -> None:
        self.written: dict[str, Any] | None = None  # config.json's "resolved", as last written

    def config(self, run: RunState) -> None:
        # a resumed run may train more epochs; config.json says what this run does: "config" as
        # asked, "resolved" as used where the config left the choice to fxdrop
        resolved = _resolved(run)
        if run.run_dir is None or resolved == self.written:
            return
        self.written = resolved
        run.run_dir.write_config(
            RunConfig(
                identity=identity(run),
                config=run.cfg.to_dict(),
                resolved=resolved,
                policy=run.policy.describe(),
            )
        )

    def epoch_end(self, run: RunState) -> None:
        """summary.csv, and config.json again when what the run uses changed (a drop chose a
        cache format)."""
        if run.run_dir:
            run.run_dir.write_summary(run.history)
        self.config(run)

    def checkpoint(self, run_dir: RunDir, state: dict[str, Any]) -> int:
        return run_dir.save_checkpoint(state)

    def metrics(self, run: RunState, metrics: Metrics) -> None:
        if run.best_state is not None:
            _export_best(run)
        run.run_dir.write_metrics(metrics)
        run.run_dir.write_samples(run.dropper.images.keys)


def _resolved(run: RunState) -> dict[str, Any]:
    """The settings a run uses: the learning rate, device, AMP, channels-last and image size it
    chose, and the format and tier of the cache it trains from (None: no cache yet)."""
    b, feed = run.b, run.dropper.feed
    size = [int(n) for n in run.dropper.dg.example_input.shape[2:]]
    return {
        "lr": run.cfg.resolved_lr(),
        "device": str(b.device),
        "amp": b.amp,
        "channels_last": b.channels_last,
        "img_size": size[0] if len(set(size)) == 1 else size,
        "batch_size_per_rank": b.batch_size,
        "world_size": run.info.world_size,
        "cache_dtype": feed.placement.fmt if feed.placement else None,
        "cache_tier": feed.tier_name,
    }


def _export_best(run: RunState) -> None:
    """model-best.safetensors: the best epoch's weights (the model's, put back after)."""
    live = {k: v.clone() for k, v in run.model.state_dict().items()}
    try:
        run.model.load_state_dict(run.best_state)
        run.run_dir.export(run.model, "model-best.safetensors")
    finally:
        run.model.load_state_dict(live)
