"""What `fit` (and an update) returns: the trained model and what the run did."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..graph import DropGraph
from ..records import Drop, Epoch, StoppedEarly, UpdateEntry

__all__ = ["FitResult", "per_step_flops"]


@dataclass
class FitResult:
    model: nn.Module  # the same object that was passed in, trained
    history: list[Epoch]  # one record per epoch (metrics.json "epochs")
    events: list[Drop]  # drops: epoch, step, cut point, the scores that decided it
    total_seconds: float
    final_val_acc: float  # the whole model, evaluated on the val images at the end
    cut: int  # final cut point index (-1: nothing dropped)
    graph: DropGraph = field(repr=False)
    cache_bytes: int = 0
    update: UpdateEntry | None = None  # an update's entry in metrics.json "updates" (fxdrop.update)
    forward_flops_fraction: float = 1.0  # per training step over the run, of the whole model's forward
    train_flops_fraction: float = 1.0  # the same for forward and backward
    checkpoint_bytes: int = 0  # the size of the last checkpoint written
    no_drop: str | None = None  # why nothing was dropped, when nothing was
    best_epoch: int | None = None  # the best validated epoch (numbered from 1): model-best.safetensors
    best_val_acc: float | None = None  # its validation accuracy
    stopped_early: StoppedEarly | None = None  # when and why `patience` ended the run; None: it did not


def per_step_flops(history: list[Epoch]) -> tuple[float, float]:
    """The forward and the training FLOPs fractions per step over every step of `history`."""
    steps = [sum(st.steps for st in h.stretches) for h in history]
    total = max(sum(steps), 1)
    forward = sum(n * h.forward_flops_fraction for n, h in zip(steps, history)) / total
    return forward, sum(n * h.train_flops_fraction for n, h in zip(steps, history)) / total
