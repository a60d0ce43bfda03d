"""The optimizer steps of a run as its driver reports them: counted in the run and in the epoch,
their losses summed, and every `every` steps of an epoch the policy's observation of the model
with the interval's mean learning rate and loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..policies import Policy
from .landing import Landings

__all__ = ["Steps"]


class Steps:
    """The steps of one process's run, `steps_per_epoch` an epoch: `policy` observes `model` every
    `every` steps of an epoch; a step that ends one of `landings` asks for a decision too."""

    def __init__(self, policy: Policy, model: nn.Module, landings: Landings, steps_per_epoch: int) -> None:
        self.policy, self.model, self.landings = policy, model, landings
        self.every = max(1, round(policy.interval * steps_per_epoch))  # steps between observations
        # optimizer steps taken in the run and in this epoch, the sum of this epoch's losses, and
        # whether the last step asks for a decision
        self.step, self.epoch_step, self.epoch_loss, self.asked = 0, 0, 0.0, False
        self.interval = _Interval()  # the observation interval running

    def epoch_start(self) -> None:
        """An epoch begins: its steps and observation intervals count from 1."""
        self.interval, self.epoch_step, self.epoch_loss = _Interval(), 0, 0.0

    def stepped(self, pstate: dict[str, Any], loss: float | torch.Tensor, lr: float) -> bool:
        """One more optimizer step, with its `loss` and learning rate `lr` (`pstate`: the
        policy's state). Returns whether the driver should ask for a decision now (also
        `asked`): the policy observed, or a landing ended."""
        loss = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self.step, self.epoch_step, self.epoch_loss = (
            self.step + 1,
            self.epoch_step + 1,
            self.epoch_loss + loss,
        )
        self.interval.add(lr, loss)
        self.asked = True
        if self.epoch_step % self.every:
            self.asked = self.landings.ends_at(self.step)
        else:
            self.policy.observe(pstate, self.model, *self.interval.means(self.every))
            self.interval = _Interval()
        return self.asked


@dataclass
class _Interval:
    """The learning rates and losses summed over one observation interval."""

    lr: float = 0.0
    loss: float = 0.0

    def add(self, lr: float, loss: float) -> None:
        self.lr += lr
        self.loss += loss

    def means(self, steps: int) -> tuple[float, float]:
        return self.lr / steps, self.loss / steps
