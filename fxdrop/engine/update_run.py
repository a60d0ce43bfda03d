"""An update: a finished run trains on, on data that has changed since, from its model, its cut and
its policy state.

It is a fit with a different start and different outputs. It starts at the run's cut: the cache
there is reopened, the samples that left the data are marked removed, and only the samples it
lacks pass through the frozen prefix. The cut may advance further, never go back. While it runs,
`update.pt` is its checkpoint (resumable like a run's); at the end it rewrites `model.safetensors`
and `samples.safetensors`, marks `update.pt` finished (the next update starts from it) and adds
one entry to `metrics.json`'s `updates`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..cache import Reuse
from ..errors import RunDirError
from ..runs import RunDir
from .loop import FitResult, _Run

__all__ = ["UpdatePlan", "UpdateRun", "UPDATE_CHECKPOINT"]

UPDATE_CHECKPOINT = "update.pt"


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


class UpdateRun(_Run):
    """One update of the finished run in `out_dir` (see the module docstring)."""

    checks_policy = False  # it continues a policy whose settings were checked for its run
    keeps_best = False  # model-best.safetensors stays the run's best epoch

    def __init__(self, *args: Any, plan: UpdatePlan, **kwargs: Any) -> None:
        super().__init__(*args, train_positions=plan.train_positions, **kwargs)
        self.plan = plan
        self.reuse, self.prefix_seconds = Reuse(), 0.0
        self.entry: dict[str, Any] | None = None

    def open_run_dir(self, resume: bool, overwrite: bool) -> None:
        if self.cfg.cache:
            self.store.check()
        if self.info.is_main:
            self.run_dir = RunDir.finished(self.out_dir)
        self.lock_cache()
        self.resuming = resume

    def write_config(self) -> None:
        """config.json stays the run's: an update changes its data, not what the run is."""

    def start(self) -> None:
        dropper = self.dropper
        dropper.pstate = self.policy.restore_state(self.plan.policy_state, self.model)
        if self.plan.cut < 0:
            return
        _, self.prefix_seconds, self.reuse = dropper.enter_cut(
            self.plan.cut, self.step, [self.opt], prune=True
        )
        if self.reuse.new and not self.reuse.reused and not self.reuse.rebuilt:  # else said already
            self.emit("cache_rebuilt", {"cut": dropper.cut, "samples": self.reuse.new})

    def load_checkpoint(self) -> dict[str, Any]:
        ck = self.run_dir.load_checkpoint(UPDATE_CHECKPOINT)
        was = ck.get("update", {})
        if (was.get("data"), was.get("replay")) != (self.plan.data, self.plan.replay):
            raise RunDirError(
                f"the interrupted update in '{self.run_dir.path}' was on '{was.get('data')}' with "
                f"`replay` {was.get('replay')}; resume it with the same data and `replay`"
            )
        return ck

    def restore(self, ck: dict[str, Any]) -> None:
        super().restore(ck)
        self.reuse, self.prefix_seconds = Reuse(**ck["update"]["reuse"]), ck["update"]["prefix_seconds"]

    def save_checkpoint(self, state: dict[str, Any]) -> int:
        progress = {
            "index": self.plan.index,
            "cut_before": self.plan.cut,
            "data": self.plan.data,
            "replay": self.plan.replay,
            "reuse": asdict(self.reuse),
            "prefix_seconds": self.prefix_seconds,
        }
        return self.run_dir.save_checkpoint(
            state | {"finished": False, "update": progress}, UPDATE_CHECKPOINT
        )

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        plan = self.plan
        self.entry = (
            {
                "update": plan.index + 1,
                "data": plan.data,
                "replay": plan.replay,
                "new_samples": plan.new_samples,
                "removed_samples": plan.removed_samples,
                "reused_samples": self.reuse.reused,  # activations found in the cache
                "reclaimed_bytes": self.reuse.reclaimed,  # given back by compacting the rows of removed samples
                "prefix_samples": self.reuse.new,  # samples that went through the frozen prefix (every cached view)
                "prefix_seconds": round(self.prefix_seconds, 3),
                "rebuilt_cache": bool(self.reuse.new and not self.reuse.reused),
                "cut_before": plan.cut,
                "cut": self.dropper.cut,
            }
            | {
                k: metrics[k]
                for k in (
                    "epochs",
                    "events",
                    "final_val_acc",
                    "total_seconds",
                    "cache_bytes",
                    "decide_seconds",
                    "declined_drops",
                    "steps_per_epoch",
                    "cache_rebuilds",
                )
            }
        )
        full = self.run_dir.read_json("metrics.json") or {}
        # an update killed after this write and resumed writes its entry again, not twice
        full["updates"] = [u for u in full.get("updates", []) if u.get("update") != plan.index + 1] + [
            self.entry
        ]
        self.run_dir.write_metrics(full)
        self.run_dir.write_samples(self.dropper.images.keys)
        self.run_dir.save_checkpoint(
            {
                "finished": True,
                "index": plan.index,
                "cut": self.dropper.cut,
                "policy": self.policy.checkpoint_state(self.dropper.pstate, self.model),
            },
            UPDATE_CHECKPOINT,
        )

    def finish(self) -> FitResult:
        result = super().finish()
        result.update = self.entry
        return result
