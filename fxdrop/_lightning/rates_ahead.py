"""The learning rate still to come in a Trainer's fit, read ahead on copies of its schedulers:
`LayerDropping` hands it to its Dropper as `fit` does (`lr_left` for the policy, the schedule a
landing follows down)."""

from __future__ import annotations

import bisect
import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch


def _lr_left(trainer: pl.Trainer) -> float | None:
    """The learning rate still to come, in LR-epochs as `fit`'s `lr_left`: the first parameter
    group's rates over the Trainer's remaining optimizer steps (`estimated_stepping_batches`),
    read ahead on copies of its schedulers (`_rates_ahead`), divided by the optimizer steps per
    epoch. A schedule that cannot be read ahead counts the current rate for the steps left.
    None: the run has no known length."""
    total, per_epoch = _run_length(trainer)
    if total is None:
        return None
    stretches = _rates_ahead(trainer, total, per_epoch)
    if stretches is None:
        rates = float(trainer.optimizers[0].param_groups[0]["lr"]) * max(total - trainer.global_step, 0)
    else:
        rates = sum(rate * (end - start) for start, end, rate in stretches)
    return rates / per_epoch


def _schedule(trainer: pl.Trainer) -> Callable[[int], float] | None:
    """The run's learning rate by optimizer step as a multiple of its base rate (the first group's
    `initial_lr`, which schedulers set), as `fit` hands its Dropper: landings follow it down.
    Read ahead once, from the step the fit starts at (a resumed landing carries its own starting
    rate), on copies of the schedulers. None where it cannot be read ahead: a landing then
    multiplies whatever the rate is."""
    total, per_epoch = _run_length(trainer)
    stretches = None if total is None else _rates_ahead(trainer, total, per_epoch)
    if not stretches:
        return None
    group = trainer.optimizers[0].param_groups[0]
    base = float(group.get("initial_lr", group["lr"]))
    starts = [start for start, _, _ in stretches]
    factors = [rate / base if base > 0 else 0.0 for _, _, rate in stretches]

    def factor(step: int) -> float:
        return factors[max(bisect.bisect_right(starts, step) - 1, 0)]

    return factor


def _run_length(trainer: pl.Trainer) -> tuple[int | None, int]:
    """The run's optimizer steps (`estimated_stepping_batches`; None: unknown) and steps per epoch."""
    total, batches = trainer.estimated_stepping_batches, trainer.num_training_batches
    if not (math.isfinite(total) and math.isfinite(batches) and batches > 0):
        return None, 1
    return int(total), math.ceil(batches / trainer.accumulate_grad_batches)


def _rates_ahead(trainer: pl.Trainer, total: int, per_epoch: int) -> list[tuple[int, int, float]] | None:
    """The first group's rate from the current optimizer step to `total`, as stretches
    `(start, end, rate)`, read on copies of the schedulers. None where it cannot be read ahead:
    ReduceLROnPlateau waits for metrics; a scheduler that fails on a copy."""
    opt, configs = trainer.optimizers[0], trainer.lr_scheduler_configs
    try:
        # a scheduler object without `optimizer` (Lightning takes any with a step()) may be this one's
        mine = [c for c in configs if getattr(c.scheduler, "optimizer", opt) is opt]
        if any(c.reduce_on_plateau or not hasattr(c.scheduler, "optimizer") for c in mine):
            return None
        return _scheduled_rates(trainer, mine, opt, total, per_epoch)
    except Exception:  # the user's schedulers, run on copies: a failure means they cannot be read ahead
        return None


def _scheduled_rates(
    trainer: pl.Trainer, configs: list[Any], opt: torch.optim.Optimizer, total: int, per_epoch: int
) -> list[tuple[int, int, float]]:
    """The first group's rates from the current step to `total` as stretches `(start, end, rate)`,
    stepping copies of the schedulers where Lightning steps them (after optimizer steps or at
    epoch ends, every `frequency`)."""
    shadow = _ShadowOptimizer(opt)
    # the copies share the optimizer's place with the shadow, and never copy the module or Trainer
    # (a scheduler's lr_lambda may be a method of the module)
    memo = {id(opt): shadow, id(trainer): trainer, id(trainer.lightning_module): trainer.lightning_module}
    schedulers = [(c, copy.deepcopy(c.scheduler, memo)) for c in configs]
    by_step = any(c.interval == "step" for c in configs)
    step, stretches = trainer.global_step, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copies are stepped without an optimizer step
        while step < total:
            # the rate is constant until the next scheduler step: the next step, or the epoch's end
            end = step + 1 if by_step else min(total, (step // per_epoch + 1) * per_epoch)
            rate = float(shadow.param_groups[0]["lr"])
            if stretches and stretches[-1][2] == rate:  # one stretch while the rate stays
                stretches[-1] = (stretches[-1][0], end, rate)
            else:
                stretches.append((step, end, rate))
            step = end
            for c, scheduler in schedulers:
                in_epoch = (step - 1) % per_epoch + 1
                epoch_end = step % per_epoch == 0
                if (c.interval == "step" and in_epoch % c.frequency == 0) or (
                    c.interval == "epoch" and epoch_end and (step // per_epoch) % c.frequency == 0
                ):
                    scheduler.step()
    return stretches


class _ShadowOptimizer:
    """What a scheduler reads and writes of its optimizer: copies of the param groups (without
    parameters), so stepping a scheduler's copy changes nothing of the run."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.param_groups = [
            copy.deepcopy({k: v for k, v in g.items() if k != "params"}) | {"params": []}
            for g in opt.param_groups
        ]
        self.defaults, self.state, self._opt_called = copy.deepcopy(opt.defaults), {}, True

    def step(self) -> None:
        pass

    step._wrapped_by_lr_sched = True  # as torch marks an optimizer's step once a scheduler holds it
