"""The best validated epoch and early stopping (timm train.py's `--patience-epochs`), read from a
run's epoch records, so a resumed run knows them from its checkpoint's history alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..records import Epoch, StoppedEarly

__all__ = ["Best", "best_of", "early_stop"]


@dataclass(frozen=True)
class Best:
    epoch: int | None  # the best validated epoch, numbered from 1; None: none validated yet
    val_acc: float | None  # its validation accuracy
    stale: int  # validated epochs since it (none better; a tie is no improvement, as in timm)


def best_of(history: Sequence[Epoch]) -> Best:
    """The first epoch with the highest `val_acc` in `history`, and the validated epochs after it."""
    epoch, acc, stale = None, None, 0
    for record in history:
        if record.val_acc is None:  # not validated (eval_every)
            continue
        if acc is None or record.val_acc > acc:
            epoch, acc, stale = record.epoch, record.val_acc, 0
        else:
            stale += 1
    return Best(epoch, acc, stale)


def early_stop(history: Sequence[Epoch], patience: int | None) -> StoppedEarly | None:
    """Why the run stops after `history` (metrics.json's "stopped_early"), or None to go on."""
    best = best_of(history)
    if patience is None or best.epoch is None or best.stale < patience:
        return None
    return StoppedEarly(
        history[-1].epoch,
        best.epoch,
        patience,
        f"{best.stale} validated epochs without a better validation accuracy than epoch "
        f"{best.epoch}'s (patience {patience})",
    )
