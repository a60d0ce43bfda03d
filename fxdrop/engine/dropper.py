"""The Dropper: the drop machinery every driver shares (`fit`, `update`, the Lightning callback,
a loop of your own: `Dropper.create`, `batches`, `stepped`, `end_epoch`, see `OwnLoop` below).

Every driver builds it on `setup.set_up` (batching, its samples, steps per epoch, cache store). It
owns the traced graph, the cut, and the feed (`feeds`: a cache built, placed in a tier and removed
through the store, or the images through the frozen prefix). A driver trains whatever module
`net` is, on batches from `feed` in `epoch_order(epoch)`, each optimizer step inside
`landings.step(run_step)` (landing segments move by their annealed share of the step); it reports
every step (`stepped`: `steps` counts them and lets the policy observe every `steps.every`) and
step timings (`timed`), and when `stepped` says so asks `decide`. Where the cut goes is its
`target`'s (targeting.py: the policy's target, the segments landing first, the step costs'
choice). A drop returns its record (`fxdrop.records`) and leaves the module to train in `net` and
where its batches come from in `feed`; it removes exactly the frozen parameters from the driver's
optimizers (the rest keep their state, groups and schedule). Its `records` (run_records.py) keep
what it did (drops, declined drops, cache builds, landings), make each epoch's record from the
stretches a driver counted (`records.epoch`) and judge them. `state_dict()` /
`load_state_dict()` carry all of it across a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from .._rng import epoch_order
from ..cache import Reuse
from ..config import FitConfig
from ..errors import FxdropError
from ..graph import DropGraph, trace
from ..policies import LearnDrop, Policy
from ..records import CacheBuild, Drop, Emit, Epoch
from .cut_choice import CutChoice
from .feeds import Feed, ImageFeed, RunFeeds
from .landing import Landings
from .run_records import RunRecords, StretchTime
from .setup import Setup, set_up
from .step import drop_from_optimizer, validate
from .stepping import Steps
from .targeting import DropTarget

__all__ = ["Dropper", "StretchTime"]


class Dropper:
    """The drop machinery of one process's run.

    Args:
        model: the model to train (on `setup.batching.device`; trained in place).
        data: `{"train": Dataset, "val": Dataset}` of `(image, label)`.
        cfg: the run's settings (cache, cost model, epochs, ...).
        policy: decides how far the cut may go.
        setup: this process's part in the run (`setup.set_up`): its batching, place in the process
            group, samples, optimizer steps per epoch and cache store.
        emit: called with the records it reports (`CacheProgress`, `Drop`, `CacheBuild`, ...).
        schedule: the driver's learning rate at an optimizer step, as a multiple of its base rate
            (landings follow it down); None: unknown.
    """

    def __init__(
        self,
        model: nn.Module,
        data: dict[str, Dataset],
        cfg: FitConfig,
        policy: Policy,
        setup: Setup,
        emit: Emit,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.model, self.cfg, self.policy, self.b, self.info = model, cfg, policy, setup.batching, setup.info
        self.steps_per_epoch = setup.steps_per_epoch
        # (B, C, H, W): two training images to trace with
        example = torch.stack([data["train"][i][0] for i in range(min(2, len(data["train"])))])
        self.dg: DropGraph = trace(model, example.to(self.b.device))
        self.pstate = policy.init_state([list(s.param_names) for s in self.dg.segments])
        policy.resolve_cuts(self.pstate, lambda c: self.dg.cut_point(c).index)
        self.images = ImageFeed(data, setup.indices, self.b)
        self.feed: Feed = self.images
        self.choice = CutChoice(self.dg, cfg, policy, self.b, self.images, setup.store)  # where the cut goes
        self.feeds = RunFeeds(self.images, self.dg, cfg, setup.store, self.choice.placement, emit, setup.tmp)
        self.cut, self.cut_step, self.prefix, self.net = -1, 0, None, model
        self.records = RunRecords(self.dg, emit, len(data["val"]))  # what it did, each epoch's
        self.landings = Landings(model, [list(s.param_names) for s in self.dg.segments], schedule)
        self.target = DropTarget(self.dg, cfg, policy, setup, self.choice, self.landings, self.records)
        self.steps = Steps(policy, model, self.landings, self.steps_per_epoch)  # taken (`stepped`)
        self.optimizers: list[torch.optim.Optimizer] = []  # the driver's, as `decide` last had them
        self.own = OwnLoop(self)  # the epochs of a loop of your own (`batches`, `end_epoch`)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset,
        *,
        policy: Policy | None = None,
        on_event: Emit | None = None,
        **config: Any,
    ) -> Dropper:
        """The Dropper of a loop of your own (see `OwnLoop` below), its run begun. Under
        torchrun each process gets its share of the samples; wrapping `module` in DDP (again
        after each drop) is the loop's.

        Args:
            model: the model to train (moved to the device; trained in place).
            train_data, val_data: map-style datasets of `(image, label)`.
            policy: when to drop (default: LearnDrop).
            on_event: called with each record the Dropper reports (drops, cache builds, ...).
            **config: fields of :class:`FitConfig` that mean something here: epochs (the
                policy's horizon), batch_size, seed, device, the cache's and the cost model's.

        Example:
            >>> dropper = fxdrop.Dropper.create(model, train_ds, val_ds, epochs=4, batch_size=64)
            >>> for x, y in dropper.batches(0, [opt]): ...
        """
        cfg, policy = FitConfig.from_kwargs(config), policy or LearnDrop()
        policy.check(cfg.epochs)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        data = {"train": train_data, "val": val_data}
        setup = set_up(model, data, cfg, device, D.init_distributed(device, cfg.dist_timeout_s))
        dropper = cls(model, data, cfg, policy, setup, on_event or (lambda record: None))
        dropper.begin()
        return dropper

    def begin(self) -> None:
        """A new run starts with the whole model training."""
        self.policy.begin(self.pstate, self.model)
        self.target.plan(self.pstate)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s order of this process's training samples (positions among them; the
        same for cached and uncached runs)."""
        return epoch_order(len(self.images.indices["train"]), self.cfg.seed, epoch)

    @property
    def module(self) -> nn.Module:
        """The module to train now: the whole model, after a drop its suffix (same parameters)."""
        return self.net

    def batches(self, epoch: int, optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[Any]:
        """Epoch `epoch`'s training batches for a loop of your own (`OwnLoop.batches`): a drop
        may come first and after each observation; it takes the frozen parameters out of
        `optimizers`. Call `stepped(loss)` after each optimizer step."""
        return self.own.batches(epoch, optimizers)

    def end_epoch(self) -> Epoch:
        """A loop of your own ended the epoch `batches` gave: its record (validated)."""
        return self.own.end_epoch()

    def new_stretch(self) -> StretchTime:
        """Steps at the current cut start (a driver counts them; `records.epoch` reads them)."""
        return StretchTime(self.cut, self.feed.cached)

    def epoch_start(self) -> None:
        """An epoch begins: its steps and observation intervals count from 1."""
        self.steps.epoch_start()

    def stepped(self, loss: float | torch.Tensor, lr: float | None = None) -> bool:
        """Called right after each optimizer step (the gradients are still there) with its loss
        and learning rate (None: the first parameter group's of the optimizers `decide` last had);
        every `steps.every` steps of an epoch the policy observes the model and the interval's
        mean rate and loss. Returns whether the driver should ask `decide` now (also
        `steps.asked`): the policy observed, or a landing ended."""
        lr = self.optimizers[0].param_groups[0]["lr"] if lr is None else lr
        return self.steps.stepped(self.pstate, loss, lr)

    def timed(self, cut: int, step_s: float, wait_s: float) -> None:
        """Steps at `cut` took `step_s` each, `wait_s` of it waiting for batches (the step costs')."""
        self.choice.timed(cut, step_s, wait_s)

    def decide(
        self,
        epoch: int,
        epochs: int,
        step: int,
        optimizers: Sequence[torch.optim.Optimizer],
        lr_left: float | None = None,
    ) -> Drop | CacheBuild | None:
        """Ask the policy how far the cut may go and the step costs where it should; apply a
        drop, or cache the current cut once freeze-only there has cost as much as the cache.

        Args:
            epoch: the epoch about to run or running (0-based); `epochs`: the run's length.
            step: optimizer steps taken so far in the run.
            optimizers: the driver's optimizers; a drop removes the frozen parameters from them.
            lr_left: the learning rate still to come (LR-epochs, see `Policy.plan`); None: the
                policy assumes the current rate continues.

        Returns:
            The record of what changed (the module to train is `net` now, its batches come from
            `feed`), or None when nothing did."""
        self.optimizers = list(optimizers)
        here = (self.cut, self.cut_step, self.feed.cached)
        decision = self.target.ask(self.pstate, (epoch, epochs, step), here, lr_left)
        if decision is None:
            return None
        if decision.cut == self.cut:  # freeze-only here has cost as much as its cache would
            _, cache_s, _ = self.enter_cut(self.cut, step, optimizers, cache=True)
            return self.records.cache_build(epoch, step, self.cut, self.feed, cache_s, decision.why)
        removed, cache_s, _ = self.enter_cut(decision.cut, step, optimizers, cache=decision.cache)
        return self.records.drop(epoch, step, self.cut, self.feed, cache_s, decision.why, removed)

    def epoch_end(self, epoch: int, record: Epoch, history: list[Epoch]) -> None:
        """Tell the policy how epoch `epoch` went (`record`; `history`: the records before it),
        after judging whether the last drop hurt."""
        last = self.records.judge(epoch, record, history, self.model)
        self.note_epoch(record)
        self.policy.epoch_end(self.pstate, record, last)

    def note_epoch(self, record: Epoch) -> None:
        """The step timings of an epoch's record, for the step costs when they are first measured."""
        self.choice.epoch_timed(record.step_seconds, record.data_seconds / self.steps_per_epoch)

    def enter_cut(
        self,
        cut: int,
        step: int,
        optimizers: Iterable[torch.optim.Optimizer],
        cache: bool = True,
        prune: bool = False,
    ) -> tuple[int, float, Reuse]:
        """Split at `cut`, drop the frozen parameters from `optimizers`, and switch the feed: with
        `cache`, a cache at `cut` (built from the current feed, or reopened and completed), else
        the images through the frozen prefix. `prune`: samples no longer in the data leave the
        cache.

        Returns (parameters removed, seconds spent caching, what the cache reused)."""
        old = self.feed
        self.prefix, self.net = self.dg.split(cut)
        removed = sum(drop_from_optimizer(opt) for opt in optimizers)
        t0 = time.perf_counter()
        self.feed, reuse = self.feeds.at(old, cut, self.prefix, cache, prune)
        seconds = time.perf_counter() - t0
        for found in reuse.rebuilt:
            self.records.rebuilt(step, cut, found)
        if reuse.new and not reuse.reused:
            self.choice.built(self.cut if old.cached else -1, cut, seconds)
        self.cut, self.cut_step = cut, step
        return removed, seconds, reuse

    def continue_from(
        self, policy_state: dict[str, Any], cut: int, optimizers: Iterable[torch.optim.Optimizer]
    ) -> tuple[float, Reuse]:
        """An update starts where its run ended: the policy's state as it was, and its `cut`
        entered again (its cache reopened, the samples that left pruned, the new ones through the
        prefix). Returns (seconds spent caching, what the cache reused)."""
        self.pstate = self.policy.restore_state(policy_state, self.model)
        if cut < 0:
            return 0.0, Reuse()
        _, seconds, reuse = self.enter_cut(cut, self.steps.step, optimizers, prune=True)
        return seconds, reuse

    def close(self, keep_cache: bool | None = None) -> None:
        """The run is over: its cache folders go unless `keep_cache` (None: as `FitConfig.keep_cache`
        says; a temporary folder always goes)."""
        self.feeds.close(self.feed, keep_cache)

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The cut, whether it is cached, the policy's state and the records (the weights are the
        model's, the optimizer's state the driver's)."""
        return {
            "cut": self.cut,
            "cached": self.feed.cached,
            "policy": self.policy_state(),
            "landings": self.landings.state_dict(),
            **self.records.state_dict(),
        }

    def load_state_dict(
        self, state: dict[str, Any], step: int, optimizers: Iterable[torch.optim.Optimizer]
    ) -> None:
        """Continue from `state_dict()` (the model's weights already loaded): the cut is entered
        again (its cache reopened, same prefix weights, or freeze-only again) and the frozen
        parameters leave `optimizers`, which then take their saved state."""
        self.pstate, self.steps.step = self.policy.restore_state(state["policy"], self.model), step
        self.records.load_state_dict(state)
        self.landings.load_state_dict(state.get("landings", {}))
        if state["cut"] >= 0:
            self.enter_cut(state["cut"], step, optimizers, cache=state.get("cached", self.cfg.cache))

    def policy_state(self) -> dict[str, Any]:
        """The policy's state as a checkpoint keeps it (an update continues from it)."""
        return self.policy.checkpoint_state(self.pstate, self.model)

    def policy_observations(self) -> dict[str, Any]:
        """What the policy observed over the run, as metrics.json reports it."""
        return self.policy.report(self.pstate)

    @property
    def events(self) -> list[Drop]:
        """The run's drops (`fxdrop.records.Drop`), judged once validated after them."""
        return self.records.events


# A loop of your own around the Dropper: your model, optimizer and loop; the Dropper gives the
# batches and the module to train, takes the loss after each optimizer step, and drops the settled
# front on the way (`Dropper.create`, `batches`, `module`, `stepped`, `end_epoch`):
#
#     dropper = fxdrop.Dropper.create(model, train_ds, val_ds, policy=fxdrop.Fixed("layer2", 2), epochs=4)
#     opt = torch.optim.SGD(model.parameters(), lr=0.05)
#     for epoch in range(4):
#         for x, y in dropper.batches(epoch, [opt]):
#             loss = F.cross_entropy(dropper.module(x), y)
#             opt.zero_grad()
#             loss.backward()
#             opt.step()
#             dropper.stepped(loss)
#         dropper.end_epoch()
#     dropper.close()
#
# `batches` asks for a drop when the epoch starts and after the policy observes; a drop removes the
# frozen parameters from the optimizers it was given and the rest of the epoch continues, in the
# same order, from the new feed. A landing segment moves by its annealed share of each step
# through the optimizers' step hooks (`Optimizer.register_step_pre_hook` / `_post_hook`).
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
