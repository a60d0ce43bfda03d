"""A loop of your own around the Dropper: your model, optimizer and loop; the Dropper gives the
batches and the module to train, takes the loss after each optimizer step, and drops the settled
front on the way (`Dropper.create`, `batches`, `module`, `stepped`, `end_epoch`):

    dropper = fxdrop.Dropper.create(model, train_ds, val_ds, policy=fxdrop.Fixed("layer2", 2), epochs=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(4):
        for x, y in dropper.batches(epoch, [opt]):
            loss = F.cross_entropy(dropper.module(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dropper.stepped(loss)
        dropper.end_epoch()
    dropper.close()

`batches` asks for a drop when the epoch starts and after the policy observes; a drop removes the
frozen parameters from the optimizers it was given and the rest of the epoch continues, in the
same order, from the new feed. A landing segment moves by its annealed share of each step
through the optimizers' step hooks (`Optimizer.register_step_pre_hook` / `_post_hook`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FxdropError
from ..records import Epoch
from .step import validate

if TYPE_CHECKING:  # the Dropper holds its OwnLoop
    from .dropper import Dropper, StretchTime

__all__ = ["OwnLoop"]


class OwnLoop:
    """The epochs of a loop of your own, as the Dropper's `batches` and `end_epoch` run them: the
    stretches of each epoch (steps at one cut), their seconds, and the epochs' records."""

    def __init__(self, dropper: Dropper) -> None:
        self.dropper = dropper
        self.history: list[Epoch] = []  # one record per ended epoch
        self.epoch = -1  # the epoch `batches` last began
        self.stretches: list[StretchTime] = []  # this epoch's
        self.t0 = 0.0  # when this epoch began

    def batches(self, epoch: int, optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[Any]:
        """Epoch `epoch`'s training batches `(x, y)` (activations where images were after a drop)."""
        d = self.dropper
        self.epoch, self.stretches, self.t0 = epoch, [], time.perf_counter()
        d.decide(epoch, d.cfg.epochs, d.steps.step, optimizers)
        d.epoch_start()
        order, done = d.epoch_order(epoch), 0
        hooks = [hook for opt in optimizers for hook in self._landing_hooks(opt)]
        try:
            while done < len(order):
                stretch, t0 = d.new_stretch(), time.perf_counter()
                self.stretches.append(stretch)
                d.net.train()
                batches = d.feed.train_batches(order[done:], epoch)
                try:
                    for x, y in batches:
                        yield x, y
                        done, stretch.steps = done + len(y), stretch.steps + 1
                        if (
                            d.steps.asked
                            and d.steps.epoch_step < d.steps_per_epoch
                            and self._dropped(optimizers)
                        ):
                            break
                finally:
                    batches.close()  # a disk tier's read-ahead thread stops with its generator
                    stretch.seconds = time.perf_counter() - t0
        finally:
            for hook in hooks:
                hook.remove()

    def end_epoch(self) -> Epoch:
        """The epoch `batches` ran is over: validate the module on the validation feed, judge the
        last drop, tell the policy, and return the epoch's record."""
        d = self.dropper
        if not self.stretches:
            raise FxdropError(
                "`end_epoch` ends the epoch `batches` gave, once; call dropper.batches(epoch, "
                "optimizers) and train on its batches first"
            )
        for st in self.stretches:
            if st.steps:
                d.timed(st.cut, st.seconds / st.steps, st.waited / st.steps)
        val = validate(d.net, d.feed.val_batches(), d.info, d.b.amp)
        seconds = time.perf_counter() - self.t0
        train_s = sum(st.seconds for st in self.stretches)
        loss = d.steps.epoch_loss / max(d.steps.epoch_step, 1)
        lr = d.optimizers[0].param_groups[0]["lr"] if d.optimizers else 0.0
        record = d.records.epoch(self.epoch, d.cut, self.stretches, loss, train_s, val, seconds, lr)
        d.epoch_end(self.epoch, record, self.history)
        self.history.append(record)
        self.stretches = []
        return record

    def _dropped(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        d = self.dropper
        return d.decide(self.epoch, d.cfg.epochs, d.steps.step, optimizers) is not None

    def _landing_hooks(self, opt: torch.optim.Optimizer) -> list[Any]:
        """Around each step of `opt`, landing segments move by their annealed share of it."""
        landings, taken = self.dropper.landings, []

        def before(*_: Any) -> None:
            taken.append(landings.before(self.dropper.steps.step))

        def after(*_: Any) -> None:
            landings.after(taken.pop())

        return [opt.register_step_pre_hook(before), opt.register_step_post_hook(after)]
