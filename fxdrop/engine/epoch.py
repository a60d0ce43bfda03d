"""A run's training, one epoch at a time: the epoch's stretches (one per cut), their batches
(mixed), the batches' optimizer steps (accumulated) and what follows each step (the schedule, the
average of the weights, progress, the policy's observations and a drop it may ask for).

`fit`'s loop (loop.py) calls `EpochTrainer.train` once per epoch, between asking for a drop and
validating; the trainer counts the run's optimizer steps (`step`) and holds the module being
trained as it runs (`Runner`), rebuilt whenever the cut moves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import distributed as D
from .._rng import seed_epoch
from ..config import FitConfig
from ..errors import DivergedError
from ..messages import Param
from ..records import Emit, EpochStart, Step
from .dropper import Dropper
from .ema import WeightsEma
from .mixing import Mixing
from .run_records import StretchTime
from .runner import Runner, timed
from .setup import Setup
from .step import Accumulation, lr_left

__all__ = ["EpochTrainer"]


class EpochTrainer:
    """Trains a run's epochs around its Dropper.

    Args:
        model: the model being trained (on its device; the Dropper's).
        dropper: the run's Dropper (its feed, the module to train, the drops).
        setup: how this process takes part in the run (batching, steps per epoch).
        cfg: the run's settings.
        opt, sched: the run's optimizer and its schedule (one step per optimizer step).
        emit: reports `EpochStart` and `Step`.
        train_step: trains one batch (`step.train_step`; loop.py hands over the one it imports,
            which tests wrap there).
    """

    def __init__(
        self,
        model: nn.Module,
        dropper: Dropper,
        setup: Setup,
        cfg: FitConfig,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LambdaLR,
        emit: Emit,
        train_step: Callable[..., torch.Tensor],
    ) -> None:
        self.model, self.dropper, self.cfg, self.opt, self.sched = model, dropper, cfg, opt, sched
        self.b, self.info, self.emit, self.train_step = setup.batching, setup.info, emit, train_step
        self.steps_per_epoch = setup.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        # in this order: the DDP wrap makes the weights rank 0's before the average copies them
        self.runner = Runner(model, self.info, self.b.device, cfg.compile)
        self.mixing = Mixing(cfg, dropper.dg.output_shape, self.info.rank)  # passes batches on if off
        self.ema = WeightsEma(model, cfg)  # the average of the weights (model_ema), or none
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # this epoch's (sum of losses x samples, samples)

    @property
    def step(self) -> int:
        """The run's optimizer steps so far (the Dropper counts them: `Dropper.stepped`)."""
        return self.dropper.steps.step

    def decide_and_drop(self, epoch: int) -> bool:
        """Ask the Dropper; returns whether the feed changed."""
        lr = lr_left(self.sched, self.step, self.total_steps, self.steps_per_epoch)
        return self.dropper.decide(epoch, self.cfg.epochs, self.step, [self.opt], lr_left=lr) is not None

    def train(self, epoch: int) -> tuple[list[StretchTime], float]:
        """One pass over this rank's training samples; returns its stretches at one cut and its
        mean loss over all ranks. After every policy observation the cut may advance: the rest of
        the epoch then continues, in the same order, from the new feed."""
        dropper = self.dropper
        order = dropper.epoch_order(epoch)
        self.emit(EpochStart(epoch + 1, self.cfg.epochs, self.steps_per_epoch, dropper.cut))
        seed_epoch(self.cfg.seed, epoch)
        self.loss_sum = torch.zeros(2, dtype=torch.float64)
        dropper.epoch_start()
        done, steps, stretches = 0, 0, []  # samples and steps so far; the stretches at each cut
        while done < len(order):
            stretch = dropper.new_stretch()
            dropped = self._train_stretch(epoch, order[done:], steps, stretch)
            stretches.append(stretch)
            steps += stretch.steps
            done = min(steps * self.cfg.grad_accum_steps * self.b.batch_size, len(order))
            if not dropped:
                break
        D.all_reduce_sum(self.loss_sum, self.info)
        D.sync_buffers(self.model, self.info)
        for st in stretches:
            if st.steps:
                dropper.timed(st.cut, st.seconds / st.steps, st.waited / st.steps)
        return stretches, (self.loss_sum[0] / max(self.loss_sum[1], 1)).item()

    def _train_stretch(self, epoch: int, order: torch.Tensor, first_step: int, stretch: StretchTime) -> bool:
        """Train on `order` (the rest of the epoch) at the current cut until the cut advances;
        fills `stretch` and returns whether a drop ended it. An optimizer step takes
        `grad_accum_steps` batches (the epoch's last one, those left), so a stretch, which starts
        and ends at an optimizer step, takes `grad_accum_steps` batches a step but its last."""
        cfg, t0, dropper = self.cfg, time.perf_counter(), self.dropper
        if self.runner.net is not dropper.net:  # the cut moved: a drop, a resume, an update's start
            self.runner = Runner(dropper.net, self.info, self.b.device, cfg.compile)
            self.ema.follow(self.model, dropper.prefix)
        dropper.net.train()
        batches = timed(dropper.feed.train_batches(order, epoch), stretch)
        accum = Accumulation(cfg.grad_accum_steps, math.ceil(len(order) / self.b.batch_size))
        step_loss = 0.0  # the mean loss of the batches of the optimizer step
        try:
            for i, (x, y) in enumerate(batches):
                # images before a drop, the cut's activations after it, cached or not
                x, y = self.mixing(x, y, epoch, first_step * cfg.grad_accum_steps + i, stretch.cut)
                k, n = accum.part(i)
                step = first_step + stretch.steps + 1  # the optimizer step of the epoch it is part of
                step_loss = (step_loss if k else 0.0) + self._train_batch(epoch, step, x, y, (k, n)) / n
                if k + 1 < n:
                    continue
                stretch.steps += 1
                if self._stepped(epoch, step, step_loss):
                    seconds = time.perf_counter() - t0
                    if step < self.steps_per_epoch and self.decide_and_drop(epoch):
                        stretch.seconds = seconds
                        return True
        finally:
            batches.close()  # a disk tier's read-ahead thread stops when its generator closes
        stretch.seconds = time.perf_counter() - t0
        return False

    def _train_batch(
        self, epoch: int, step: int, x: torch.Tensor, y: torch.Tensor, part: tuple[int, int]
    ) -> float:
        """One batch of optimizer step `step` through `train_step` (which steps after the last
        batch of `part`); returns its loss."""
        cfg = self.cfg
        with self.dropper.landings.step(self.step):  # a batch that does not step moves nothing
            loss = self.train_step(
                self.runner,
                x,
                y,
                self.opt,
                self.b.amp,
                cfg.label_smoothing,
                cfg.clip_grad,
                cfg.clip_mode,
                part,
            ).item()
        self.runner.stepped()
        if not math.isfinite(loss):
            raise DivergedError(
                "training diverged at epoch {epoch}, step {step} (loss {loss}); the last good checkpoint "
                "is kept and nothing was exported; lower {lr} and resume or rerun",
                epoch=epoch + 1,
                step=step,
                loss=loss,
                lr=Param("lr"),
            )
        self.loss_sum += torch.tensor([loss * len(y), len(y)], dtype=torch.float64)
        return loss

    def _stepped(self, epoch: int, step: int, loss: float) -> bool:
        """After optimizer step `step` of the epoch (`loss`: its batches' mean): the schedule, the
        average of the weights, progress, and the policy's observations. Returns whether the
        Dropper asks to be asked for a drop now."""
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        asked = self.dropper.stepped(loss, lr)  # counts the step (`self.step`) and observes
        self.ema.update(self.step)
        self.emit(Step(epoch + 1, step, self.steps_per_epoch, loss))
        return asked
