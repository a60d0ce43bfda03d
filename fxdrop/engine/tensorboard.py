"""TensorBoard event files for a run (timm train.py's `--log-tensorboard`): per epoch the
training and validation loss, top-1, learning rate, step seconds and cut; each drop as a text
event. Written under `<out>/tensorboard` by the main process, one step per epoch (numbered from 1,
as summary.csv's rows). Optional: `pip install tensorboard` (FitConfig checks it is there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TensorBoard", "SCALARS"]

# tag -> the epoch record's key (summary.csv's columns under TensorBoard's names)
SCALARS = {
    "train/loss": "train_loss",
    "val/loss": "val_loss",
    "val/top1": "val_acc",
    "train/lr": "lr",
    "train/step_seconds": "step_seconds",
    "train/cut": "cut",
}


class TensorBoard:
    """The run's event writer, or none (`folder` None: every method does nothing)."""

    def __init__(self, folder: str | Path | None, fresh: bool = True) -> None:
        self.writer = None
        if folder is None:
            return
        from torch.utils.tensorboard import SummaryWriter  # the optional dependency

        if fresh:  # a run started anew (--overwrite) shows its own events, not the last run's too
            for old in Path(folder).glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(folder))

    def epoch(self, record: dict[str, Any], drops: list[dict[str, Any]]) -> None:
        """Epoch `record` (metrics.json's), and the `drops` made in it."""
        if self.writer is None:
            return
        step = record["epoch"]
        for tag, key in SCALARS.items():
            if record.get(key) is not None:  # val_* are None in an epoch not validated
                self.writer.add_scalar(tag, record[key], step)
        for drop in drops:
            where = drop.get("module") or drop.get("node")
            text = f"epoch {drop['epoch']}, step {drop['step']}: cut at {where} ({drop['cut']})"
            self.writer.add_text(
                "drops", text + "\n\n    " + json.dumps(drop.get("why", {}), default=str), step
            )
        self.writer.flush()  # an epoch's events are on disk with its checkpoint

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
