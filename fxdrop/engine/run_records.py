"""The records of one run's drop machinery (`fxdrop.records`): what the Dropper did (drops, drops
the step costs declined, cache builds and rebuilds, landings), each epoch's record made from the
stretches a driver counted, and their judgement: whether a drop hurt, validation at chance, why
nothing was dropped. The Dropper reports to a `RunRecords` as it acts; `state_dict()` /
`load_state_dict()` carry the records across a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..cost import Decision
from ..graph import DropGraph
from ..policies import Policy
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
from .feeds import Feed

__all__ = ["RunRecords", "StretchTime"]


@dataclass
class StretchTime:
    """The steps of an epoch taken at one cut, as a driver counts them (the feed changes only
    between stretches); the epoch's record (`RunRecords.epoch`) is made from them."""

    cut: int
    cached: bool  # the prefix's activations came from the cache (else the prefix ran, freeze-only)
    steps: int = 0
    seconds: float = 0.0  # until the drop that ended it, if one did
    waited: float = 0.0  # waiting for batches


class RunRecords:
    """The records of one run on the graph `dg`, each reported to `emit` as it is made; `n_val`:
    the validation samples (the noise a drop's judgement allows)."""

    def __init__(self, dg: DropGraph, emit: Emit, n_val: int) -> None:
        self.dg, self.emit, self.n_val = dg, emit, n_val
        self.events: list[Drop] = []
        self.declined: list[Declined] = []  # drops the policy allowed but the costs refused
        self.cache_builds: list[CacheBuild] = []  # caches built at a cut reached freeze-only
        self.cache_rebuilds: list[CacheRebuilt] = []  # caches found failing a check, rebuilt
        self.val_at_chance: ValAtChance | None = None  # validation at chance while the loss fell
        self.landings: list[Landing | LandingCancelled] = []
        # the policy's last answer: why nothing was dropped, if nothing was
        self.last_why: dict[str, Any] = {}

    # ---- what the Dropper did ----------------------------------------------------------------

    def drop(
        self, epoch: int, step: int, cut: int, feed: Feed, cache_s: float, why: dict[str, Any], removed: int
    ) -> Drop:
        """The drop to `cut` in epoch `epoch` (from 0) at optimizer step `step`, its batches from
        `feed` (built in `cache_s` seconds), `removed` parameters taken out of the optimizers."""
        cp = self.dg.cut_points[cut]
        event = Drop(
            **self._at_cut(epoch, step, cut, feed, cache_s, why),
            forward_flops_fraction=cp.suffix_flops / self.dg.total_flops,
            frozen_params=cp.prefix_params,
            removed_from_optimizer=removed,
            cached=feed.cached,
        )
        self.events.append(event)
        self.emit(event)
        return event

    def cache_build(
        self, epoch: int, step: int, cut: int, feed: Feed, cache_s: float, why: dict[str, Any]
    ) -> CacheBuild:
        """The cache `feed` built at the current `cut`, reached freeze-only."""
        record = CacheBuild(**self._at_cut(epoch, step, cut, feed, cache_s, why))
        self.cache_builds.append(record)
        self.emit(record)
        return record

    def decline(
        self, epoch: int, step: int, cut: int, seg: int, why: dict[str, Any], decision: Decision
    ) -> None:
        """A drop from `cut` up to `seg` the policy allowed and the step costs refused (`why`); a
        repeat, asked at every observation, says nothing new."""
        if not decision.why.get("repeat"):
            self.declined.append(Declined(epoch + 1, step, cut, seg, why))

    def rebuilt(self, step: int, cut: int, found: dict[str, Any]) -> None:
        """A cache at `cut` failed a check (`found`) and was rebuilt."""
        self.cache_rebuilds.append(CacheRebuilt(step=step, cut=cut, **found))
        self.emit(self.cache_rebuilds[-1])

    def landing(self, epoch: int, step: int, segs: list[int], ends: int | None = None) -> None:
        """Segments `segs` start landing at `step`, landed at `ends`; None: their landing is
        cancelled."""
        modules = [self.segment_name(s) for s in segs]
        if ends is None:
            record: Landing | LandingCancelled = LandingCancelled(epoch + 1, step, segs, modules)
        else:
            record = Landing(epoch + 1, step, segs, modules, ends)
        self.landings.append(record)
        self.emit(record)

    # ---- epochs ------------------------------------------------------------------------------

    def epoch(
        self,
        epoch: int,
        cut: int,
        stretches: Sequence[StretchTime],
        train_loss: float,
        train_seconds: float,
        val: tuple[float | None, float | None],
        seconds: float,
        lr: float,
    ) -> Epoch:
        """The record of epoch `epoch` (from 0), ended at `cut` (the Dropper's): its `stretches`
        of steps at one cut with their FLOPs, the mean `train_loss`, `train_seconds` (drops within
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
        cp = self.dg.cut_points[cut] if cut >= 0 else None
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
            cut=cut,
            cut_module=cp.module if cp else None,
            lr=lr,
        )

    def flops_fractions(self, cut: int, cached: bool) -> tuple[float, float]:
        """(forward, forward + backward) FLOPs of one step at `cut`, as fractions of the whole
        model's: a frozen prefix recomputed every step (freeze-only) still runs its forward."""
        if cut < 0:
            return 1.0, 1.0
        suffix = self.dg.cut_points[cut].suffix_flops / self.dg.total_flops
        forward = suffix if cached else 1.0
        return forward, (forward + 2 * suffix) / 3  # a backward costs about twice its forward

    def judge(self, epoch: int, record: Epoch, history: list[Epoch], model: nn.Module) -> Drop | None:
        """Epoch `epoch` ended (`record`; `history`: the records before it): judge whether the
        last drop hurt and whether `model` validates at chance (said once a run). Returns the drop
        made in this epoch, if one was."""
        _judge_drops(self.events, history, record, self.n_val)
        if self.val_at_chance is None:
            self.val_at_chance = at_chance(model, record, history, self.dg.output_shape, self.n_val)
            if self.val_at_chance is not None:
                self.emit(self.val_at_chance)
        return self.events[-1] if self.events and self.events[-1].epoch == epoch + 1 else None

    # ---- what the records say ----------------------------------------------------------------

    def no_drop_reason(self, cut: int, policy: Policy) -> str | None:
        """Why the run, now at `cut`, dropped nothing, when it did not: the step costs declined
        what the policy allowed, or the policy's own reason."""
        if self.events:
            return None
        if self.declined:
            last = self.declined[-1]
            return (
                f"the policy allowed dropping up to {self.segment_name(last.allowed)}, but the step costs "
                f"declined it ({last.decision or 'no saving'})"
            )
        reason = policy.reason(self.last_why, self.segment_name)
        if cut >= 0:  # an update that started at its run's cut
            return f"the update continued from the run's cut after {self.segment_name(cut)}; {reason}"
        return reason

    def decide_seconds(self) -> float:
        return sum(e.why.get("decide_seconds", 0.0) for e in self.events) + sum(
            d.decide_seconds for d in self.declined
        )

    def cache_build_seconds(self) -> float:
        return sum(e.cache_seconds for e in [*self.events, *self.cache_builds])

    def segment_name(self, s: int) -> str:
        """The module segment s ends with (the head after the last cut)."""
        if s >= len(self.dg.cut_points):
            return "the head"
        cp = self.dg.cut_points[s]
        return cp.module or cp.name

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "events": [e.to_json() for e in self.events],
            "declined": [d.to_json() for d in self.declined],
            "cache_builds": [b.to_json() for b in self.cache_builds],
            "cache_rebuilds": [r.to_json() for r in self.cache_rebuilds],
            "val_at_chance": self.val_at_chance.to_json() if self.val_at_chance else None,
            "landing_events": [e.to_json() for e in self.landings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [Drop.from_json(e) for e in state["events"]]
        self.declined = [Declined.from_json(d) for d in state.get("declined", [])]
        self.cache_builds = [CacheBuild.from_json(b) for b in state.get("cache_builds", [])]
        self.cache_rebuilds = [CacheRebuilt.from_json(r) for r in state.get("cache_rebuilds", [])]
        chance = state.get("val_at_chance")
        self.val_at_chance = ValAtChance.from_json(chance) if chance else None
        self.landings = [Landing.from_json(e) for e in state.get("landing_events", [])]

    def _at_cut(
        self, epoch: int, step: int, cut: int, feed: Feed, cache_s: float, why: dict[str, Any]
    ) -> dict[str, Any]:
        """What a drop event and a cache build both record: when, where, and the cache made."""
        cp = self.dg.cut_points[cut]
        placement = feed.placement  # the cache's format and why it was chosen
        return {
            "epoch": epoch + 1,
            "step": step,
            "cut": cut,
            "node": cp.name,
            "module": cp.module,
            "cache_seconds": round(cache_s, 3),
            "cache_bytes": feed.nbytes,
            "cache_tier": feed.tier_name,
            **({"cache_dtype": placement.fmt, "cache_dtype_why": placement.why} if placement else {}),
            "why": why,
        }


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
