"""How far the next drop goes: the policy's target, the segments that land first (their learning
rate anneals to zero over `FitConfig.landing` epochs before they freeze), and the step costs'
choice among the cuts the policy allows (`CutChoice`). The Dropper asks it at each decision and
applies its answer (a drop, or a cache at the current cut); what it declined and the landings it
started or cancelled go to the run's records.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from .. import distributed as D
from ..config import FitConfig
from ..cost import Decision
from ..graph import DropGraph
from ..policies import Policy
from .cut_choice import CutChoice
from .landing import Landings
from .run_records import RunRecords
from .setup import Setup

__all__ = ["DropTarget"]


class DropTarget:
    """The drop decisions of one process's run on the graph `dg` (`setup`: its place in the
    process group, whose ranks all take the main process's decisions, and its optimizer steps an
    epoch); `landings` anneal the segments that land, `records` keep what it decided."""

    def __init__(
        self,
        dg: DropGraph,
        cfg: FitConfig,
        policy: Policy,
        setup: Setup,
        choice: CutChoice,
        landings: Landings,
        records: RunRecords,
    ) -> None:
        self.dg, self.policy, self.info, self.choice = dg, policy, setup.info, choice
        self.landings, self.records, self.steps_per_epoch = landings, records, setup.steps_per_epoch
        self.cache, self.epochs = cfg.cache, cfg.epochs
        # the optimizer steps over which a segment lands before it freezes (0: at once)
        self.landing_steps = round(cfg.landing * self.steps_per_epoch)
        self.furthest: int | None = None  # the furthest segment the policy will ever allow

    def plan(self, pstate: dict[str, Any]) -> None:
        """A run begins: the landings the policy plans ahead (a fixed drop, FreezeOut's)."""
        per_epoch = self.steps_per_epoch
        planned = self.policy.landings(pstate, per_epoch, self.epochs * per_epoch, self.landing_steps)
        self.landings.plan(planned)
        for start, end in sorted(set(planned.values())):
            segs = sorted(s for s, span in planned.items() if span == (start, end))
            self.records.landing(start // per_epoch, start, segs, end)

    def ask(
        self,
        pstate: dict[str, Any],
        at: tuple[int, int, int],
        cut: tuple[int, int, bool],
        lr_left: float | None,
    ) -> Decision | None:
        """Where the cut goes now, and why; None: where it is.

        Args:
            pstate: the policy's state.
            at: (epoch, epochs, step): the epoch running (0-based), the run's length, and the
                optimizer steps taken so far.
            cut: (cut, cut_step, cached): the cut now, the step it was entered at, whether its
                activations come from a cache.
            lr_left: the learning rate still to come (see `Policy.plan`); None: as it is now.

        Returns:
            The step costs' decision (beyond `cut`: a drop; at `cut` with a cache: build it) with
            all its reasons (the policy's and the costs'), or None (a drop declined is recorded)."""
        (epoch, epochs, step), (now, _, cached) = at, cut
        if lr_left is not None:
            self.policy.plan(pstate, lr_left)
        seg, why = self.policy.target(pstate, epoch, epochs, now)
        self.furthest = self.policy.furthest(pstate)  # a cut there moves no more
        self.records.last_why = why
        seg = D.broadcast_object(seg, self.info)  # identical decisions on every rank
        if self.landings.by_segment or (self.policy.lands and self.landing_steps):
            seg = self._land(seg, why, at, cut)
        # freeze-only at the allowed cut: its cache may have been rented long enough
        cache_due = seg == now >= 0 and self.cache and not cached
        if seg <= now and not cache_due:
            return None
        t0 = time.perf_counter()
        decision = self._choose(seg, cut, step, epochs * self.steps_per_epoch - step)
        why = why | decision.why | {"decide_seconds": round(time.perf_counter() - t0, 4)}
        build_cache = decision.cut == now and decision.cache and not cached  # the cut stays
        if decision.cut <= now and not build_cache:
            self.records.decline(epoch, step, now, seg, why, decision)
            return None
        return replace(decision, why=why)

    def _land(
        self, seg: int, why: dict[str, Any], at: tuple[int, int, int], cut: tuple[int, int, bool]
    ) -> int:
        """The policy allows dropping up to `seg` (`why`): land what it newly names where the
        step costs would take the drop, cancel landings it no longer allows, and return how far
        the drop may go now: over the segments that have landed."""
        (epoch, epochs, step), now = at, cut[0]
        for s in self.landings.cancel(seg, step):
            self.records.landing(epoch, step, [s])
        todo = [s for s in range(now + 1, seg + 1) if self.dg.segments[s].param_names]
        if self.policy.lands and self.landing_steps and any(s not in self.landings.by_segment for s in todo):
            t0 = time.perf_counter()
            steps_left = epochs * self.steps_per_epoch - step - self.landing_steps
            decision = self._choose(seg, cut, step, steps_left)
            new = self.landings.start([s for s in todo if s <= decision.cut], step, self.landing_steps)
            if new:
                ends = max(self.landings.by_segment[s].end for s in new)
                self.records.landing(epoch, step, new, ends)
            elif decision.cut <= now:
                seconds = {"decide_seconds": round(time.perf_counter() - t0, 4)}
                self.records.decline(epoch, step, now, seg, why | decision.why | seconds, decision)
        return min(seg, self.landings.landed(seg, step, after=now))

    def _choose(self, seg: int, cut: tuple[int, int, bool], step: int, steps_left: int) -> Decision:
        """The cut choice's answer (`CutChoice.choose`), the main process's on every rank."""
        here = (seg, *cut, step, steps_left, self.furthest)
        return D.broadcast_object(self.choice.choose(*here) if self.info.is_main else None, self.info)
