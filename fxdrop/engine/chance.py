"""Validation at chance while the training loss falls: the model evaluates differently than it
trains. The usual cause is BatchNorm running statistics that lag the weights (a low momentum in a
short run); the record says so, once, on screen and in metrics.json (`"val_at_chance"`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..records import Epoch, ValAtChance

__all__ = ["at_chance"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DEFAULT_MOMENTUM = 0.1  # PyTorch's; lower means running statistics follow the batches more slowly


def at_chance(
    model: nn.Module,
    record: Epoch,
    history: Sequence[Epoch],
    output_shape: tuple[int, ...] | None,
    n_val: int,
) -> ValAtChance | None:
    """The record of a validation at chance (within twice the binomial noise of 1/classes over
    `n_val` samples) after the training loss fell by 5% or more since the first epoch (`history`:
    the epochs before `record`), with why; None otherwise, or when the model's output is not one
    score per class."""
    acc = record.val_acc
    if acc is None or not history or not output_shape or len(output_shape) != 1 or output_shape[0] < 2:
        return None
    classes = output_shape[0]
    chance = 1 / classes
    first, now = history[0].train_loss, record.train_loss
    if acc > chance + 2 * math.sqrt(chance * (1 - chance) / max(n_val, 1)) or not now < 0.95 * first:
        return None
    momenta = [
        m.momentum
        for m in model.modules()
        if isinstance(m, _BATCH_NORMS) and m.track_running_stats and m.momentum is not None
    ]
    low = min(momenta, default=_DEFAULT_MOMENTUM)
    seen = (
        f"validation accuracy {100 * acc:.2f}% is chance (1/{classes}) while the training loss fell "
        f"from {first:.3f} to {now:.3f}"
    )
    if low < _DEFAULT_MOMENTUM:
        why = (
            f"{seen}: the model's BatchNorm momentum is {low:g}, so the running statistics validation "
            "uses lag the weights in a short run; train longer, or raise the BatchNorm momentum "
            f"(e.g. to {_DEFAULT_MOMENTUM})"
        )
    else:
        why = f"{seen}: the model evaluates differently than it trains (running statistics, dropout)"
    return ValAtChance(record.epoch, acc, chance, first, now, min(momenta, default=None), why)
