"""An update: a finished run trains on, on data that has changed since, from its model, its cut and
its policy state.

It is a fit with another start and other outputs (`UpdateStart`, `UpdateWrites`; the loop is
fit's). It starts at the run's cut: the cache there is reopened, the samples that left the data
are marked removed, and only the samples it lacks pass through the frozen prefix. The cut may
advance further, never go back. While it runs, `update.pt` is its checkpoint (resumable like a
run's); at the end it rewrites `model.safetensors` and `samples.safetensors`, marks `update.pt`
finished (the next update starts from it) and adds one entry to `metrics.json`'s `updates`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..cache import Reuse
from ..errors import RunDirError
from ..messages import Param
from ..records import CacheGone, Metrics, UpdateEntry
from ..runs import RunDir

if TYPE_CHECKING:
    from .run_kinds import RunState

__all__ = ["StartPoint", "UpdatePlan", "UpdateStart", "UpdateWrites", "UPDATE_CHECKPOINT"]

UPDATE_CHECKPOINT = "update.pt"


@dataclass(frozen=True)
class StartPoint:
    """Where an update starts, as a checkpoint says it. A run's checkpoint.pt and a finished
    update.pt name the cut it ended at and the policy's state then; an interrupted update.pt (written
    by `UpdateWrites.checkpoint`) names the cut its update started from and its number."""

    cut: int
    policy_state: dict[str, Any]
    interrupted: bool = False  # an update that did not finish, to be resumed
    index: int | None = None  # the interrupted update's number in metrics.json "updates"

    @classmethod
    def of(cls, ck: dict[str, Any]) -> StartPoint:
        if ck.get("finished") is False:
            progress = ck["update"]
            return cls(progress["cut_before"], ck["policy"], True, progress["index"])
        return cls(ck["cut"], ck["policy"])


@dataclass(frozen=True)
class UpdatePlan:
    """Where an update starts and what it trains on."""

    index: int  # this update's number in metrics.json "updates" (0: the first)
    cut: int  # the run's cut when it ended (-1: nothing dropped)
    policy_state: dict[str, Any]  # the policy's state when the run ended
    data: str  # what the data is (a folder's path), recorded, and checked when resuming
    replay: str  # "all": train on every training sample; "new": only on those the run never saw
    new_samples: int  # samples (train + val) not in the run's data
    removed_samples: int  # samples of the run's data that are gone
    train_positions: torch.Tensor | None  # with replay "new": the dataset indices to train on
    interrupted: dict[str, Any] | None = None  # an interrupted update's update.pt, as `update` read it


class UpdateStart:
    """An update starts at its run's end (`plan`), or resumes from `update.pt`; it keeps what its
    start reused of the cache and the seconds the prefix took."""

    def __init__(self, plan: UpdatePlan) -> None:
        self.plan, self.train_positions = plan, plan.train_positions
        self.reuse, self.prefix_seconds = Reuse(), 0.0

    def open(self, run: RunState, resume: bool, overwrite: bool) -> tuple[RunDir | None, bool]:
        return (RunDir.finished(run.out_dir) if run.info.is_main else None), resume

    def begin(self, run: RunState) -> None:
        self.prefix_seconds, self.reuse = run.dropper.continue_from(
            self.plan.policy_state, self.plan.cut, [run.opt]
        )
        if self.reuse.new and not self.reuse.reused and not self.reuse.rebuilt:  # else said already
            run.emit(CacheGone(run.dropper.cut, self.reuse.new))

    def load(self, run_dir: RunDir) -> dict[str, Any]:
        ck = self.plan.interrupted  # read once, where the update read its run
        assert ck is not None, "an update resumes only from the update.pt it read"
        was = ck.get("update", {})
        if (was.get("data"), was.get("replay")) != (self.plan.data, self.plan.replay):
            raise RunDirError(
                "the interrupted update in '{path}' was on '{data}' with {was}; resume it with the same "
                "data and {replay}",
                path=run_dir.path,
                data=was.get("data"),
                was=Param("replay", was.get("replay")),
                replay=Param("replay"),
            )
        return ck

    def restored(self, ck: dict[str, Any]) -> None:
        self.reuse, self.prefix_seconds = Reuse(**ck["update"]["reuse"]), ck["update"]["prefix_seconds"]


class UpdateWrites:
    """An update writes `update.pt` and its entry in metrics.json's "updates"; config.json and
    model-best.safetensors stay the run's (an update changes its data, not what the run is)."""

    keeps_best = False

    def __init__(self, start: UpdateStart) -> None:
        self.start = start

    def config(self, run: RunState) -> None:
        """config.json stays the run's."""

    def epoch_end(self, run: RunState) -> None:
        """summary.csv stays the run's (its epochs)."""

    def checkpoint(self, run_dir: RunDir, state: dict[str, Any]) -> int:
        plan, start = self.start.plan, self.start
        progress = {
            "index": plan.index,
            "cut_before": plan.cut,
            "data": plan.data,
            "replay": plan.replay,
            "reuse": asdict(start.reuse),
            "prefix_seconds": start.prefix_seconds,
        }
        return run_dir.save_checkpoint(state | {"finished": False, "update": progress}, UPDATE_CHECKPOINT)

    def metrics(self, run: RunState, metrics: Metrics) -> UpdateEntry:
        plan, reuse, run_dir = self.start.plan, self.start.reuse, run.run_dir
        entry = UpdateEntry(
            update=plan.index + 1,
            data=plan.data,
            replay=plan.replay,
            new_samples=plan.new_samples,
            removed_samples=plan.removed_samples,
            reused_samples=reuse.reused,
            reclaimed_bytes=reuse.reclaimed,
            prefix_samples=reuse.new,
            prefix_seconds=round(self.start.prefix_seconds, 3),
            rebuilt_cache=bool(reuse.new and not reuse.reused),
            cut_before=plan.cut,
            cut=run.dropper.cut,
            epochs=metrics.epochs,
            events=metrics.events,
            final_val_acc=metrics.final_val_acc,
            total_seconds=metrics.total_seconds,
            cache_bytes=metrics.cache_bytes,
            decide_seconds=metrics.decide_seconds,
            declined_drops=metrics.declined_drops,
            steps_per_epoch=metrics.steps_per_epoch,
            cache_rebuilds=metrics.cache_rebuilds,
        )
        run_dir.write_metrics((run_dir.read_metrics() or Metrics()).with_update(entry))
        run_dir.write_samples(run.dropper.images.keys)
        finished = {"finished": True, "index": plan.index, "cut": run.dropper.cut}
        run_dir.save_checkpoint(finished | {"policy": run.dropper.policy_state()}, UPDATE_CHECKPOINT)
        return entry
