"""The Dropper: the drop machinery every driver shares (`fit`, `update`, the Lightning callback).

It owns the traced graph, the cut, the feed and its cache (built, placed in a tier, removed
through the store), the step costs and the landings. A driver trains whatever module `net` is, on
batches from `feed`, each optimizer step inside `landings.step(run_step)` (landing segments move
by their annealed share of the step); it reports every step (`stepped`, which lets the policy
observe every `observe_every` steps) and step timings (`timed`), and when `stepped` says so asks
`decide`. A segment the policy names lands first (its learning rate anneals to zero over
`FitConfig.landing` epochs) and drops when it has landed. A drop returns the module to train now
and where its batches come from, and removes exactly the frozen parameters from the driver's
optimizers (the rest keep their state, groups and schedule). `state_dict()` /
`load_state_dict()` carry all of it across a checkpoint.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from ..cache import CacheStore, Placement, Reuse, choose_placement, codec, data_fingerprint, shard_bytes_for
from ..config import FitConfig
from ..cost import Decision, StepCosts, measure_bandwidth, measure_write_rate, segment_seconds
from ..graph import DropGraph, trace
from ..policies import Policy
from .chance import at_chance
from .feeds import Batching, Feed, ImageFeed, PrefixFeed, build_cache_feed
from .landing import Landings
from .step import drop_from_optimizer

__all__ = ["Dropper", "Drop", "EventFn"]

EventFn = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Drop:
    """What `decide` changed: the module to train now, the feed of its batches, and the record
    (a drop event, or a cache built at the cut reached freeze-only) written to metrics.json."""

    net: nn.Module
    feed: Feed
    record: dict[str, Any]
    kind: str  # "drop": the cut advanced; "cached": the current cut's activations were cached


class Dropper:
    """The drop machinery of one process's run.

    Args:
        model: the model to train (moved to `batching.device`; trained in place).
        data: `{"train": Dataset, "val": Dataset}` of `(image, label)`.
        cfg: the run's settings (cache, cost model, epochs, ...).
        policy: decides how far the cut may go.
        batching: how this process makes batches.
        info: this process's place in the process group.
        store: where caches live.
        emit: progress events (`"cache"`, `"drop"`, `"cached"`).
        steps_per_epoch: the driver's optimizer steps per epoch.
        indices: per split, the dataset indices this process trains and validates on.
        schedule: the driver's learning rate at an optimizer step, as a multiple of its base rate
            (landings follow it down); None: unknown.
    """

    def __init__(
        self,
        model: nn.Module,
        data: dict[str, Dataset],
        cfg: FitConfig,
        policy: Policy,
        batching: Batching,
        info: D.DistInfo,
        store: CacheStore,
        emit: EventFn,
        steps_per_epoch: int,
        indices: dict[str, torch.Tensor],
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.model, self.data, self.cfg, self.policy = model, data, cfg, policy
        self.b, self.info = batching, info
        self.store, self.emit, self.steps_per_epoch = store, emit, steps_per_epoch
        # (B, C, H, W): two training images to trace with
        example = torch.stack([data["train"][i][0] for i in range(min(2, len(data["train"])))])
        self.dg: DropGraph = trace(model, example.to(batching.device))
        self.pstate = policy.init_state([list(s.param_names) for s in self.dg.segments])
        policy.resolve_cuts(self.pstate, lambda c: self.dg.cut_point(c).index)
        self.images = ImageFeed(data, indices, batching)
        self.feed: Feed = self.images
        self.cut, self.cut_step, self.prefix, self.net = -1, 0, None, model
        self.costs: StepCosts | None = None  # measured at the first decision the cost model makes
        self.events: list[dict[str, Any]] = []  # drops
        self.declined: list[dict[str, Any]] = []  # drops the policy allowed but the costs refused
        self.cache_builds: list[dict[str, Any]] = []  # caches built at a cut reached freeze-only
        self.cache_rebuilds: list[dict[str, Any]] = []  # caches found failing a check, rebuilt
        self.val_at_chance: dict[str, Any] | None = None  # validation at chance while the loss fell
        # the policy's last answer: why nothing was dropped, if nothing was
        self.last_why: dict[str, Any] = {}
        self.interval = _Interval()  # the observation interval running
        self.last_epoch: tuple[float, float] | None = None  # the last epoch's (step, wait) seconds per step
        # segments whose learning rate anneals to zero before they freeze
        self.landings = Landings(model, [list(s.param_names) for s in self.dg.segments], schedule)
        self.landing_events: list[dict[str, Any]] = []  # landings started and cancelled

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

    def epoch_start(self) -> None:
        """An epoch begins: observation intervals count its steps from 1."""
        self.interval = _Interval()

    def stepped(self, step: int, lr: float, loss: float, run_step: int | None = None) -> bool:
        """Called right after optimizer step `step` of the epoch (1-based; the gradients are still
        there) with its learning rate and loss, and `run_step`, the steps taken in the run so far;
        every `observe_every` steps the policy observes the model and the interval's mean rate and
        loss. Returns whether the driver should ask `decide` now: the policy observed, or a landing
        ended."""
        self.interval.add(lr, loss)
        if step % self.observe_every:
            return run_step is not None and self.landings.ends_at(run_step)
        self.policy.observe(self.pstate, self.model, *self.interval.means(self.observe_every))
        self.interval = _Interval()
        return True

    def timed(self, cut: int, step_s: float, wait_s: float) -> None:
        """Steps at `cut` took `step_s` each, `wait_s` of it waiting for batches (measured by the
        driver; they correct the step costs)."""
        if self.costs is not None:
            self.costs.observe(cut, step_s, wait_s)

    def decide(
        self,
        epoch: int,
        epochs: int,
        step: int,
        optimizers: Sequence[torch.optim.Optimizer],
        lr_left: float | None = None,
    ) -> Drop | None:
        """Ask the policy how far the cut may go and the step costs where it should; apply a
        drop, or cache the current cut once freeze-only there has cost as much as the cache.

        Args:
            epoch: the epoch about to run or running (0-based); `epochs`: the run's length.
            step: optimizer steps taken so far in the run.
            optimizers: the driver's optimizers; a drop removes the frozen parameters from them.
            lr_left: the learning rate still to come (LR-epochs, see `Policy.plan`); None: the
                policy assumes the current rate continues.

        Returns:
            What changed, or None when nothing did."""
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
        decision = D.broadcast_object(
            self._choose_cut(seg, step, steps_left) if self.info.is_main else None, self.info
        )
        why = why | decision.why | {"decide_seconds": round(time.perf_counter() - t0, 4)}
        if decision.cut == self.cut and decision.cache and not cached:
            return self._cache_current_cut(epoch, step, optimizers, why)
        if decision.cut <= self.cut:
            self._decline(epoch, step, seg, why, decision)
            return None
        removed, cache_s, _ = self.enter_cut(decision.cut, step, optimizers, cache=decision.cache)
        cp = self.dg.cut_points[self.cut]
        event = self._cut_record(epoch, step, cache_s, why) | {
            "forward_flops_fraction": cp.suffix_flops / self.dg.total_flops,
            "frozen_params": cp.prefix_params,
            "removed_from_optimizer": removed,
            "cached": self.feed.cached,
        }
        self.events.append(event)
        self.emit("drop", event)
        return Drop(self.net, self.feed, event, "drop")

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
            decision = D.broadcast_object(
                self._choose_cut(seg, step, steps_left) if self.info.is_main else None, self.info
            )
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
            self.declined.append({"epoch": epoch + 1, "step": step, "kept": self.cut, "allowed": seg, **why})

    def _landing_event(self, kind: str, epoch: int, step: int, segs: list[int]) -> None:
        record = {
            "kind": kind,
            "epoch": epoch + 1,
            "step": step,
            "segments": segs,
            "modules": [self._segment_name(s) for s in segs],
            "ends_at_step": max(self.landings.by_segment[s].end for s in segs) if kind == "landing" else None,
        }
        self.landing_events.append(record)
        self.emit(kind, record)

    def epoch_end(self, epoch: int, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Tell the policy how epoch `epoch` went (`record`, with `val_acc` when it validated;
        `history`: the records before it), after judging whether the last drop hurt."""
        _judge_drops(self.events, history, record, len(self.data["val"]))
        self.note_epoch(record)
        if self.val_at_chance is None:  # said once a run
            n_val = len(self.data["val"])
            self.val_at_chance = at_chance(self.model, record, history, self.dg.output_shape, n_val)
            if self.val_at_chance is not None:
                self.emit("val_at_chance", self.val_at_chance)
        last = self.events[-1] if self.events and self.events[-1]["epoch"] == epoch + 1 else None
        self.policy.epoch_end(self.pstate, record, last)

    def note_epoch(self, record: dict[str, Any]) -> None:
        """The step timings of an epoch's record, for the step costs when they are first measured."""
        if "step_seconds" in record:
            self.last_epoch = record["step_seconds"], record["data_seconds"] / self.steps_per_epoch

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
                choose=lambda kept: self._placement(cut, kept),
                progress=lambda info: self.emit("cache", info),
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
            self.cache_rebuilds.append({"step": step, "cut": cut} | found)
            self.emit("cache_rebuilt", self.cache_rebuilds[-1])
        if reuse.new and not reuse.reused and self.costs is not None:
            self.costs.built(self.cut if old.cached else -1, cut, self.cache_samples(), seconds)
        self.cut, self.cut_step = cut, step
        return removed, seconds, reuse

    def close(self, keep_cache: bool) -> None:
        """The run is over: its cache folders go unless `keep_cache`."""
        if not keep_cache:
            for folder in self.feed.folders.values():
                self.store.remove(folder)
        self.store.remove_root_if_empty()

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The cut, whether it is cached, the policy's state and the records (the weights are the
        model's, the optimizer's state the driver's)."""
        return {
            "cut": self.cut,
            "cached": self.feed.cached,
            "policy": self.policy.checkpoint_state(self.pstate, self.model),
            "events": self.events,
            "declined": self.declined,
            "cache_builds": self.cache_builds,
            "cache_rebuilds": self.cache_rebuilds,
            "val_at_chance": self.val_at_chance,
            "landings": self.landings.state_dict(),
            "landing_events": self.landing_events,
        }

    def load_state_dict(
        self, state: dict[str, Any], step: int, optimizers: Iterable[torch.optim.Optimizer]
    ) -> None:
        """Continue from `state_dict()` (the model's weights already loaded): the cut is entered
        again (its cache reopened, same prefix weights, or freeze-only again) and the frozen
        parameters leave `optimizers`, which then take their saved state."""
        self.pstate = self.policy.restore_state(state["policy"], self.model)
        self.events, self.declined = state["events"], state.get("declined", [])
        self.cache_builds = state.get("cache_builds", [])
        self.cache_rebuilds = state.get("cache_rebuilds", [])
        self.val_at_chance = state.get("val_at_chance")
        self.landings.load_state_dict(state.get("landings", {}))
        self.landing_events = state.get("landing_events", [])
        if state["cut"] >= 0:
            self.enter_cut(state["cut"], step, optimizers, cache=state.get("cached", self.cfg.cache))

    # ---- what the records say ----------------------------------------------------------------

    def no_drop_reason(self) -> str | None:
        """Why the run dropped nothing, when it did not: the step costs declined what the policy
        allowed, or the policy's own reason."""
        if self.events:
            return None
        if self.declined:
            last = self.declined[-1]
            return (
                f"the policy allowed dropping up to {self._segment_name(last['allowed'])}, but the step costs "
                f"declined it ({last.get('decision', 'no saving')})"
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
        return sum(e["why"].get("decide_seconds", 0.0) for e in self.events) + sum(
            d.get("decide_seconds", 0.0) for d in self.declined
        )

    def cache_build_seconds(self) -> float:
        return sum(e["cache_seconds"] for e in [*self.events, *self.cache_builds])

    def cache_samples(self) -> int:
        return len(self.images.indices["train"]) * self.cfg.cache_views + len(self.images.indices["val"])

    # ---- inside ------------------------------------------------------------------------------

    def _cache_current_cut(
        self, epoch: int, step: int, optimizers: Sequence[torch.optim.Optimizer], why: dict[str, Any]
    ) -> Drop:
        """Freeze-only at the current cut has cost as much as its cache would: build it (the cut
        and the weights stay; only the feed changes)."""
        _, cache_s, _ = self.enter_cut(self.cut, step, optimizers, cache=True)
        record = self._cut_record(epoch, step, cache_s, why)
        self.cache_builds.append(record)
        self.emit("cached", record)
        return Drop(self.net, self.feed, record, "cached")

    def _cut_record(self, epoch: int, step: int, cache_s: float, why: dict[str, Any]) -> dict[str, Any]:
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

    def _placement(self, cut: int, kept: str | None = None) -> Placement:
        """The format and tier of a cache at `cut` (measured free memory, `cache_memory`); under
        `auto`, a valid cache already there keeps its format `kept` (resume, update)."""
        samples, shape = self.cache_samples(), self.dg.cut_points[cut].shape
        fmt = kept if kept and self.cfg.cache_dtype == "auto" else self.cfg.cache_dtype
        placement = choose_placement(
            lambda f: samples * codec(f).sample_bytes(shape),
            self.b.device,
            fmt,
            self.cfg.cache_tier,
            self.b.amp,
            self.cfg.cache_memory,
        )
        if fmt != self.cfg.cache_dtype:
            placement = replace(placement, why=f"{fmt}, as the cache already there was written")
        return placement

    def _choose_cut(self, seg: int, step: int, steps_left: int) -> Decision:
        """Where the cut goes when the policy allows dropping segments up to `seg`: exactly there
        for exact policies; else among the cuts up to the last one that freezes no more
        parameters, by the step costs (or the smallest activation without a cost model)."""
        if self.policy.exact:
            return Decision(seg, {})
        last = seg
        while last + 1 < len(self.dg.cut_points) and not self.dg.segments[last + 1].param_names:
            last += 1
        if not (self.cfg.cache and self.cfg.cost_model):
            return Decision(
                min(range(seg, last + 1), key=lambda k: (self.dg.cut_points[k].bytes_per_sample, -k)),
                {},
                cache=self.cfg.cache,
            )
        costs, cached = self.step_costs(), self.feed.cached
        rent = 0.0
        if self.cut >= 0 and not cached:  # what freeze-only has cost more than a cache, since the cut moved
            rent = (step - self.cut_step) * max(
                costs.step_s(self.cut, cached=False) - costs.step_s(self.cut), 0.0
            )
        return costs.decide(self.cut, last, steps_left, self.cache_samples(), cached=cached, rent=rent)

    def step_costs(self) -> StepCosts:
        """The run's step costs, measured at the first decision that needs them: one timed forward
        and forward+backward of every segment on a training batch, the write rate and, per tier
        (when first asked), the read bandwidth."""
        if self.costs is not None:
            return self.costs
        n = min(self.b.batch_size, len(self.images.indices["train"]))
        x = next(self.images.images("train", torch.arange(n), 0, self.b.batch_size))[0]  # (B, C, H, W)
        folder = str(self.store.root.parent) if self.store.root.parent.is_dir() else None
        placements: dict[int, Placement] = {}
        bandwidths: dict[str, float] = {}

        def placement(k: int) -> Placement:
            if k not in placements:
                placements[k] = self._placement(k)
            return placements[k]

        def bandwidth(k: int) -> float:
            tier = placement(k).tier
            if tier not in bandwidths:
                bandwidths[tier] = measure_bandwidth(tier, self.b.device, folder=folder)
            return bandwidths[tier]

        forward, train = segment_seconds(self.dg, x, self.b.amp)
        self.costs = StepCosts(
            self.dg,
            forward,
            len(x),
            bandwidth,
            lambda k: codec(placement(k).fmt).sample_bytes(self.dg.cut_points[k].shape),
            train_s=train,
            write_bytes_per_s=measure_write_rate(folder),
        )
        if self.last_epoch is not None:
            self.costs.observe(self.cut, *self.last_epoch)
        return self.costs


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


def _judge_drops(
    events: list[dict[str, Any]], history: list[dict[str, Any]], record: dict[str, Any], n_val: int
) -> None:
    """After the first validation that follows a drop, record whether the drop hurt: validation
    accuracy fell below the last one before the drop by more than twice its sampling noise
    (binomial standard error over `n_val` samples)."""
    acc = record.get("val_acc")
    if acc is None:
        return
    for event in events:
        if "val_acc_after" in event:
            continue
        before = [h["val_acc"] for h in history if h["epoch"] < event["epoch"] and h["val_acc"] is not None]
        if not before:
            event["val_acc_after"], event["hurt"] = acc, False
            continue
        noise = math.sqrt(max(before[-1] * (1 - before[-1]), 1e-4) / n_val)
        event |= {
            "val_acc_before": before[-1],
            "val_acc_after": acc,
            "val_noise": round(noise, 4),
            "hurt": acc < before[-1] - 2 * noise,
        }
