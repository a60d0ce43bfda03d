"""The Dropper: the drop machinery every driver shares (`fit`, `update`, the Lightning callback,
a loop of your own: `Dropper.create`, `batches`, `stepped`, `end_epoch`, see own_loop.py).

Every driver builds it on `setup.set_up` (batching, its samples, steps per epoch, cache store). It
owns the traced graph, the cut, the feed and its cache (built, placed in a tier, removed through
the store) and the landings; where the cut goes is its `CutChoice`'s (cut_choice.py). A driver
trains whatever module `net` is, on batches from `feed` in `epoch_order(epoch)`, each optimizer
step inside `landings.step(run_step)` (landing segments move by their annealed share of the
step); it reports every step (`stepped`, which counts them and lets the policy observe every
`observe_every` steps) and step timings (`timed`), and when `stepped` says so asks `decide`.
A segment the policy names lands first (its learning rate anneals to zero over
`FitConfig.landing` epochs) and drops when it has landed. A drop returns its record (`fxdrop.records`)
and leaves the module to train in `net` and where its batches come from in `feed`; it removes
exactly the frozen parameters from the driver's optimizers (the rest keep their state, groups and
schedule). The Dropper keeps the records of what it did (drops, declined drops, cache builds,
landings) and builds each epoch's (`epoch_record`) from the stretches a driver counted. `state_dict()` /
`load_state_dict()` carry all of it across a checkpoint.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from .._rng import epoch_order
from ..cache import Reuse, data_fingerprint, shard_bytes_for
from ..config import FitConfig
from ..cost import Decision
from ..graph import DropGraph, trace
from ..policies import LearnDrop, Policy
from ..records import (
    CacheBuild,
    CacheRebuilt,
    Declined,
    Drop,
    Emit,
    Epoch,
    Landing,
    LandingCancelled,
    Stretch,
    ValAtChance,
)
from .chance import at_chance
from .cut_choice import CutChoice
from .feeds import Feed, ImageFeed, PrefixFeed, build_cache_feed
from .landing import Landings
from .own_loop import OwnLoop
from .setup import Setup, set_up
from .step import drop_from_optimizer

__all__ = ["Dropper", "StretchTime"]


@dataclass
class StretchTime:
    """The steps of an epoch taken at one cut, as a driver counts them (the feed changes only
    between stretches); the epoch's record (`Dropper.epoch_record`) is made from them."""

    cut: int
    cached: bool  # the prefix's activations came from the cache (else the prefix ran, freeze-only)
    steps: int = 0
    seconds: float = 0.0  # until the drop that ended it, if one did
    waited: float = 0.0  # waiting for batches


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
        self.model, self.data, self.cfg, self.policy = model, data, cfg, policy
        self.b, self.info, self.store, self.tmp = setup.batching, setup.info, setup.store, setup.tmp
        self.emit, self.steps_per_epoch = emit, setup.steps_per_epoch
        # (B, C, H, W): two training images to trace with
        example = torch.stack([data["train"][i][0] for i in range(min(2, len(data["train"])))])
        self.dg: DropGraph = trace(model, example.to(self.b.device))
        self.pstate = policy.init_state([list(s.param_names) for s in self.dg.segments])
        policy.resolve_cuts(self.pstate, lambda c: self.dg.cut_point(c).index)
        self.images = ImageFeed(data, setup.indices, self.b)
        self.feed: Feed = self.images
        self.choice = CutChoice(self.dg, cfg, policy, self.b, self.images, self.store)  # where the cut goes
        self.cut, self.cut_step, self.prefix, self.net = -1, 0, None, model
        self.events: list[Drop] = []
        self.declined: list[Declined] = []  # drops the policy allowed but the costs refused
        self.cache_builds: list[CacheBuild] = []  # caches built at a cut reached freeze-only
        self.cache_rebuilds: list[CacheRebuilt] = []  # caches found failing a check, rebuilt
        self.val_at_chance: ValAtChance | None = None  # validation at chance while the loss fell
        # the policy's last answer: why nothing was dropped, if nothing was
        self.last_why: dict[str, Any] = {}
        self.interval = _Interval()  # the observation interval running
        # segments whose learning rate anneals to zero before they freeze
        self.landings = Landings(model, [list(s.param_names) for s in self.dg.segments], schedule)
        self.landing_events: list[Landing | LandingCancelled] = []
        # optimizer steps taken in the run and in this epoch (`stepped` counts them), the sum of
        # this epoch's losses, and whether the last step asks for a decision
        self.step, self.epoch_step, self.epoch_loss, self.asked = 0, 0, 0.0, False
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
        """The Dropper of a loop of your own (see `engine/own_loop.py`), its run begun. Under
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

    @functools.cached_property
    def data_fps(self) -> dict[str, str]:
        """Each split's `data_fingerprint`, taken when the first cache needs it (an unkeyed
        dataset is read for it, which may draw from its random augmentation)."""
        return {split: data_fingerprint(ds) for split, ds in self.data.items()}

    # ---- what a driver calls -----------------------------------------------------------------

    def begin(self) -> None:
        """A new run starts with the whole model training."""
        self.policy.begin(self.pstate, self.model)
        planned = self.policy.landings(
            self.pstate, self.steps_per_epoch, self.cfg.epochs * self.steps_per_epoch, self.landing_steps
        )
        self.landings.plan(planned)
        for start, end in sorted(set(planned.values())):
            segs = sorted(s for s, span in planned.items() if span == (start, end))
            self._landing_event("landing", start // self.steps_per_epoch, start, segs)

    @property
    def landing_steps(self) -> int:
        """The optimizer steps over which a segment lands before it freezes (0: at once)."""
        return round(self.cfg.landing * self.steps_per_epoch)

    @property
    def observe_every(self) -> int:
        """Optimizer steps between two policy observations."""
        return max(1, round(self.policy.interval * self.steps_per_epoch))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s order of this process's training samples (positions among them; the
        same for cached and uncached runs)."""
        return epoch_order(len(self.images.indices["train"]), self.cfg.seed, epoch)

    def batch_count(self, split: str) -> int:
        """Batches in one pass over this process's `split` (validation batches are larger)."""
        size = self.b.batch_size if split == "train" else self.b.eval_batch_size
        return math.ceil(len(self.images.indices[split]) / size)

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
        """Steps at the current cut start (a driver counts them; `epoch_record` reads them)."""
        return StretchTime(self.cut, self.feed.cached)

    def epoch_start(self) -> None:
        """An epoch begins: its steps and observation intervals count from 1."""
        self.interval, self.epoch_step, self.epoch_loss = _Interval(), 0, 0.0

    def stepped(self, loss: float | torch.Tensor, lr: float | None = None) -> bool:
        """Called right after each optimizer step (the gradients are still there) with its loss
        and learning rate (None: the first parameter group's of the optimizers `decide` last had);
        every `observe_every` steps of an epoch the policy observes the model and the interval's
        mean rate and loss. Returns whether the driver should ask `decide` now (also `asked`):
        the policy observed, or a landing ended."""
        loss = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        lr = self.optimizers[0].param_groups[0]["lr"] if lr is None else lr
        self.step, self.epoch_step, self.epoch_loss = (
            self.step + 1,
            self.epoch_step + 1,
            self.epoch_loss + loss,
        )
        self.interval.add(lr, loss)
        self.asked = True
        if self.epoch_step % self.observe_every:
            self.asked = self.landings.ends_at(self.step)
        else:
            self.policy.observe(self.pstate, self.model, *self.interval.means(self.observe_every))
            self.interval = _Interval()
        return self.asked

    def timed(self, cut: int, step_s: float, wait_s: float) -> None:
        """Steps at `cut` took `step_s` each, `wait_s` of it waiting for batches (measured by the
        driver; they correct the step costs)."""
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
        if lr_left is not None:
            self.policy.plan(self.pstate, lr_left)
        seg, why = self.policy.target(self.pstate, epoch, epochs, self.cut)
        self.last_why = why
        seg = D.broadcast_object(seg, self.info)  # identical decisions on every rank
        if self.landings.by_segment or (self.policy.lands and self.landing_steps):
            seg = self._land(seg, why, epoch, epochs, step)
        cached = self.feed.cached
        # freeze-only at the allowed cut: its cache may have been rented long enough
        cache_due = seg == self.cut >= 0 and self.cfg.cache and not cached
        if seg <= self.cut and not cache_due:
            return None
        t0 = time.perf_counter()
        steps_left = epochs * self.steps_per_epoch - step
        decision = self._choose_cut(seg, step, steps_left)
        why = why | decision.why | {"decide_seconds": round(time.perf_counter() - t0, 4)}
        if decision.cut == self.cut and decision.cache and not cached:
            return self._cache_current_cut(epoch, step, optimizers, why)
        if decision.cut <= self.cut:
            self._decline(epoch, step, seg, why, decision)
            return None
        removed, cache_s, _ = self.enter_cut(decision.cut, step, optimizers, cache=decision.cache)
        cp = self.dg.cut_points[self.cut]
        event = Drop(
            **self._at_cut(epoch, step, cache_s, why),
            forward_flops_fraction=cp.suffix_flops / self.dg.total_flops,
            frozen_params=cp.prefix_params,
            removed_from_optimizer=removed,
            cached=self.feed.cached,
        )
        self.events.append(event)
        self.emit(event)
        return event

    def _land(self, seg: int, why: dict[str, Any], epoch: int, epochs: int, step: int) -> int:
        """The policy allows dropping up to `seg` (`why`): land what it newly names where the
        step costs would take the drop, cancel landings it no longer allows, and return how far
        the drop may go now: over the segments that have landed."""
        for s in self.landings.cancel(seg, step):
            self._landing_event("landing_cancelled", epoch, step, [s])
        todo = [s for s in range(self.cut + 1, seg + 1) if self.dg.segments[s].param_names]
        if self.policy.lands and self.landing_steps and any(s not in self.landings.by_segment for s in todo):
            t0 = time.perf_counter()
            steps_left = epochs * self.steps_per_epoch - step - self.landing_steps
            decision = self._choose_cut(seg, step, steps_left)
            new = self.landings.start([s for s in todo if s <= decision.cut], step, self.landing_steps)
            if new:
                self._landing_event("landing", epoch, step, new)
            elif decision.cut <= self.cut:
                seconds = {"decide_seconds": round(time.perf_counter() - t0, 4)}
                self._decline(epoch, step, seg, why | decision.why | seconds, decision)
        return min(seg, self.landings.landed(seg, step, after=self.cut))

    def _decline(self, epoch: int, step: int, seg: int, why: dict[str, Any], decision: Decision) -> None:
        """Record a drop up to `seg` the policy allowed and the step costs refused (`why`); a
        repeat, asked at every observation, says nothing new."""
        if not decision.why.get("repeat"):
            self.declined.append(Declined(epoch + 1, step, self.cut, seg, why))

    def _landing_event(self, kind: str, epoch: int, step: int, segs: list[int]) -> None:
        modules = [self._segment_name(s) for s in segs]
        if kind == "landing":
            ends = max(self.landings.by_segment[s].end for s in segs)
            record: Landing | LandingCancelled = Landing(epoch + 1, step, segs, modules, ends)
        else:
            record = LandingCancelled(epoch + 1, step, segs, modules)
        self.landing_events.append(record)
        self.emit(record)

    def epoch_record(
        self,
        epoch: int,
        stretches: Sequence[StretchTime],
        train_loss: float,
        train_seconds: float,
        val: tuple[float | None, float | None],
        seconds: float,
        lr: float,
    ) -> Epoch:
        """The record of epoch `epoch` (from 0), ended at the current cut: its `stretches` of
        steps at one cut with their FLOPs, the mean `train_loss`, `train_seconds` (drops within
        the epoch included), `val` (accuracy, loss; None: not validated), `seconds` (the whole
        epoch) and the learning rate `lr` at its end."""
        records = []
        for st in stretches:
            forward, train = self.flops_fractions(st.cut, st.cached)
            records.append(
                Stretch(st.cut, st.cached, st.steps, round(st.seconds / max(st.steps, 1), 6), forward, train)
            )
        steps = max(sum(st.steps for st in stretches), 1)
        # per step of the epoch, as a fraction of the whole model's: the forward, and the forward
        # and backward
        forward = sum(st.steps * r.forward_flops_fraction for st, r in zip(stretches, records)) / steps
        train = sum(st.steps * r.train_flops_fraction for st, r in zip(stretches, records)) / steps
        cp = self.dg.cut_points[self.cut] if self.cut >= 0 else None
        return Epoch(
            epoch + 1,
            train_loss=train_loss,
            train_seconds=round(train_seconds, 3),
            step_seconds=round(sum(st.seconds for st in stretches) / steps, 6),  # waiting included
            data_seconds=round(sum(st.waited for st in stretches), 3),
            forward_flops_fraction=forward,
            train_flops_fraction=train,
            stretches=records,
            val_acc=val[0],
            val_loss=val[1],
            seconds=round(seconds, 3),
            cut=self.cut,
            cut_module=cp.module if cp else None,
            lr=lr,
        )

    def epoch_end(self, epoch: int, record: Epoch, history: list[Epoch]) -> None:
        """Tell the policy how epoch `epoch` went (`record`; `history`: the records before it),
        after judging whether the last drop hurt."""
        _judge_drops(self.events, history, record, len(self.data["val"]))
        self.note_epoch(record)
        if self.val_at_chance is None:  # said once a run
            n_val = len(self.data["val"])
            self.val_at_chance = at_chance(self.model, record, history, self.dg.output_shape, n_val)
            if self.val_at_chance is not None:
                self.emit(self.val_at_chance)
        last = self.events[-1] if self.events and self.events[-1].epoch == epoch + 1 else None
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
        t0, reuse = time.perf_counter(), Reuse()
        if cache and self.cfg.cache:
            self.feed, reuse = build_cache_feed(
                self.store,
                self.dg,
                old if old.cached else self.images,
                self.images,
                cut,
                self.prefix,
                views=self.cfg.cache_views,
                data_fps=self.data_fps,
                b=self.b,
                choose=lambda kept: self.choice.placement(cut, kept),
                progress=self.emit,
                prune=prune,
                shard_bytes=shard_bytes_for(self.cfg.cache_memory),
            )
        else:
            self.feed = PrefixFeed(self.images, self.prefix, self.cfg.cache_views)
        for split, folder in old.folders.items():
            if folder != self.feed.folders.get(split):
                self.store.remove(folder)
        seconds = time.perf_counter() - t0
        for found in reuse.rebuilt:
            self.cache_rebuilds.append(CacheRebuilt(step=step, cut=cut, **found))
            self.emit(self.cache_rebuilds[-1])
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
        _, seconds, reuse = self.enter_cut(cut, self.step, optimizers, prune=True)
        return seconds, reuse

    def close(self, keep_cache: bool | None = None) -> None:
        """The run is over: its cache folders go unless `keep_cache` (None: as `FitConfig.keep_cache`
        says; a temporary folder always goes)."""
        keep_cache = self.cfg.keep_cache if keep_cache is None else keep_cache
        if not keep_cache or self.tmp is not None:
            for folder in self.feed.folders.values():
                self.store.remove(folder)
        self.store.remove_root_if_empty()
        if self.tmp is not None:
            self.tmp.cleanup()

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The cut, whether it is cached, the policy's state and the records (the weights are the
        model's, the optimizer's state the driver's)."""
        return {
            "cut": self.cut,
            "cached": self.feed.cached,
            "policy": self.policy_state(),
            "events": [e.to_json() for e in self.events],
            "declined": [d.to_json() for d in self.declined],
            "cache_builds": [b.to_json() for b in self.cache_builds],
            "cache_rebuilds": [r.to_json() for r in self.cache_rebuilds],
            "val_at_chance": self.val_at_chance.to_json() if self.val_at_chance else None,
            "landings": self.landings.state_dict(),
            "landing_events": [e.to_json() for e in self.landing_events],
        }

    def load_state_dict(
        self, state: dict[str, Any], step: int, optimizers: Iterable[torch.optim.Optimizer]
    ) -> None:
        """Continue from `state_dict()` (the model's weights already loaded): the cut is entered
        again (its cache reopened, same prefix weights, or freeze-only again) and the frozen
        parameters leave `optimizers`, which then take their saved state."""
        self.pstate, self.step = self.policy.restore_state(state["policy"], self.model), step
        self.events = [Drop.from_json(e) for e in state["events"]]
        self.declined = [Declined.from_json(d) for d in state.get("declined", [])]
        self.cache_builds = [CacheBuild.from_json(b) for b in state.get("cache_builds", [])]
        self.cache_rebuilds = [CacheRebuilt.from_json(r) for r in state.get("cache_rebuilds", [])]
        chance = state.get("val_at_chance")
        self.val_at_chance = ValAtChance.from_json(chance) if chance else None
        self.landings.load_state_dict(state.get("landings", {}))
        self.landing_events = [Landing.from_json(e) for e in state.get("landing_events", [])]
        if state["cut"] >= 0:
            self.enter_cut(state["cut"], step, optimizers, cache=state.get("cached", self.cfg.cache))

    # ---- what the records say ----------------------------------------------------------------

    @property
    def sample_keys(self) -> dict[str, torch.Tensor]:
        """Every sample's cache key, per split (samples.safetensors: what the run trained on)."""
        return self.images.keys

    def val_images(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation images' batches (the whole model's evaluation, whatever the cut)."""
        return self.images.val_batches()

    def policy_state(self) -> dict[str, Any]:
        """The policy's state as a checkpoint keeps it (an update continues from it)."""
        return self.policy.checkpoint_state(self.pstate, self.model)

    def policy_observations(self) -> dict[str, Any]:
        """What the policy observed over the run, as metrics.json reports it."""
        return self.policy.report(self.pstate)

    def no_drop_reason(self) -> str | None:
        """Why the run dropped nothing, when it did not: the step costs declined what the policy
        allowed, or the policy's own reason."""
        if self.events:
            return None
        if self.declined:
            last = self.declined[-1]
            return (
                f"the policy allowed dropping up to {self._segment_name(last.allowed)}, but the step costs "
                f"declined it ({last.decision or 'no saving'})"
            )
        reason = self.policy.reason(self.last_why, self._segment_name)
        if self.cut >= 0:  # an update that started at its run's cut
            return f"the update continued from the run's cut after {self._segment_name(self.cut)}; {reason}"
        return reason

    def flops_fractions(self, cut: int, cached: bool) -> tuple[float, float]:
        """(forward, forward + backward) FLOPs of one step at `cut`, as fractions of the whole
        model's: a frozen prefix recomputed every step (freeze-only) still runs its forward."""
        if cut < 0:
            return 1.0, 1.0
        suffix = self.dg.cut_points[cut].suffix_flops / self.dg.total_flops
        forward = suffix if cached else 1.0
        return forward, (forward + 2 * suffix) / 3  # a backward costs about twice its forward

    def decide_seconds(self) -> float:
        return sum(e.why.get("decide_seconds", 0.0) for e in self.events) + sum(
            d.decide_seconds for d in self.declined
        )

    def cache_build_seconds(self) -> float:
        return sum(e.cache_seconds for e in [*self.events, *self.cache_builds])

    # ---- inside ------------------------------------------------------------------------------

    def _cache_current_cut(
        self, epoch: int, step: int, optimizers: Sequence[torch.optim.Optimizer], why: dict[str, Any]
    ) -> CacheBuild:
        """Freeze-only at the current cut has cost as much as its cache would: build it (the cut
        and the weights stay; only the feed changes)."""
        _, cache_s, _ = self.enter_cut(self.cut, step, optimizers, cache=True)
        record = CacheBuild(**self._at_cut(epoch, step, cache_s, why))
        self.cache_builds.append(record)
        self.emit(record)
        return record

    def _at_cut(self, epoch: int, step: int, cache_s: float, why: dict[str, Any]) -> dict[str, Any]:
        """What a drop event and a cache build both record: when, where, and the cache made."""
        cp = self.dg.cut_points[self.cut]
        return {
            "epoch": epoch + 1,
            "step": step,
            "cut": self.cut,
            "node": cp.name,
            "module": cp.module,
            "cache_seconds": round(cache_s, 3),
            "cache_bytes": self.feed.nbytes,
            "cache_tier": self.feed.tier_name,
            **self._cache_format(),
            "why": why,
        }

    def _choose_cut(self, seg: int, step: int, steps_left: int) -> Decision:
        """The cut choice's answer (`CutChoice.choose`), the main process's on every rank."""
        here = (seg, self.cut, self.cut_step, self.feed.cached, step, steps_left)
        return D.broadcast_object(self.choice.choose(*here) if self.info.is_main else None, self.info)

    def _segment_name(self, s: int) -> str:
        """The module segment s ends with (the head after the last cut)."""
        if s >= len(self.dg.cut_points):
            return "the head"
        cp = self.dg.cut_points[s]
        return cp.module or cp.name

    def _cache_format(self) -> dict[str, str]:
        """The current cache's format and why it was chosen (drop and build records)."""
        placement = self.feed.placement
        return {"cache_dtype": placement.fmt, "cache_dtype_why": placement.why} if placement else {}


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


def _judge_drops(events: list[Drop], history: list[Epoch], record: Epoch, n_val: int) -> None:
    """After the first validation that follows a drop, record (in `events`, the drop's record
    replaced by its judged one) whether the drop hurt: validation accuracy fell below the last one
    before the drop by more than twice its sampling noise (binomial standard error over `n_val`
    samples)."""
    acc = record.val_acc
    if acc is None:
        return
    for i, event in enumerate(events):
        if event.judged:
            continue
        before = [h.val_acc for h in history if h.epoch < event.epoch and h.val_acc is not None]
        if not before:
            events[i] = replace(event, val_acc_after=acc, hurt=False)
            continue
        noise = math.sqrt(max(before[-1] * (1 - before[-1]), 1e-4) / n_val)
        events[i] = replace(
            event,
            val_acc_before=before[-1],
            val_acc_after=acc,
            val_noise=round(noise, 4),
            hurt=acc < before[-1] - 2 * noise,
        )
