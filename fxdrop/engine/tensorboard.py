"""TensorBoard event files for a run (timm train.py's `--log-tensorboard`): per epoch the
training and validation loss, top-1, learning rate, step seconds and cut; each drop as a text
event. Written under `<out>/tensorboard` by the main process, one step per epoch (numbered from 1,
as summary.csv's rows). Optional: `pip install tensorboard` (FitConfig checks it is there)."""

from __future__ import annotations

import json
from pathlib import Path

from ..records import Drop, Epoch

__all__ = ["TensorBoard"]


class TensorBoard:
    """The run's event writer, or none (`folder` None: every method does nothing).

    Args:
        folder: where the event files go (`<out>/tensorboard`); None: nowhere.
        fresh: remove the event files already there (a run started anew, not resumed).
    """

    def __init__(self, folder: str | Path | None, fresh: bool = True) -> None:
        self.writer = None
        if folder is None:
            return
        from torch.utils.tensorboard import SummaryWriter  # the optional dependency

        if fresh:  # a run started anew (--overwrite) shows its own events, not the last run's too
            for old in Path(folder).glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(folder))

    def epoch(self, record: Epoch, drops: list[Drop]) -> None:
        """Epoch `record` (metrics.json's), and the `drops` made in it."""
        if self.writer is None:
            return
        scalars = {  # summary.csv's columns under TensorBoard's names
            "train/loss": record.train_loss,
            "val/loss": record.val_loss,  # None in an epoch not validated (eval_every)
            "val/top1": record.val_acc,
            "train/lr": record.lr,
            "train/step_seconds": record.step_seconds,  # per optimizer step
            "train/cut": record.cut,
        }
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, record.epoch)
        for drop in drops:
            text = f"epoch {drop.epoch}, step {drop.step}: cut after {drop.where} ({drop.cut})"
            self.writer.add_text("drops", text + "\n\n    " + json.dumps(drop.why, default=str), record.epoch)
        self.writer.flush()  # an epoch's events are on disk with its checkpoint

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
