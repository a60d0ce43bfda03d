"""Where the cut goes: among the cuts a policy allows, the one the step costs say pays most, and
the format and tier of a cache there.

The step costs are measured once, at the first decision that needs them (one timed forward and
forward+backward of every segment on a training batch, the write rate and, per tier when first
asked, the read bandwidth), and corrected by the step timings the driver reports.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ..cache import CacheStore, Placement, choose_placement, codec
from ..config import FitConfig
from ..cost import Decision, StepCosts, measure_bandwidth, measure_write_rate, segment_seconds
from ..graph import DropGraph
from ..policies import Policy
from .feeds import Batching, ImageFeed

__all__ = ["CutChoice"]


class CutChoice:
    """The cut choice of one process's run.

    Args:
        dg: the traced model.
        cfg: the run's settings (cache, cost model, cache format and tier, ...).
        policy: an exact policy's cut is taken as it is.
        b: how the run makes batches.
        images: the run's images (its samples; a batch of them times the segments).
        store: where its caches live (the write rate is measured beside them).
    """

    def __init__(
        self,
        dg: DropGraph,
        cfg: FitConfig,
        policy: Policy,
        b: Batching,
        images: ImageFeed,
        store: CacheStore,
    ) -> None:
        self.dg, self.cfg, self.policy, self.b, self.images, self.store = dg, cfg, policy, b, images, store
        # the samples a cache holds: every cached view of each training sample, and the validation set
        self.samples = len(images.indices["train"]) * cfg.cache_views + len(images.indices["val"])
        self.costs: StepCosts | None = None  # measured at the first decision the cost model makes
        self.last_epoch: tuple[float, float] | None = None  # the last epoch's (step, wait) seconds per step

    def choose(
        self,
        seg: int,
        cut: int,
        cut_step: int,
        cached: bool,
        step: int,
        steps_left: int,
        furthest: int | None = None,
    ) -> Decision:
        """Where the cut goes when the policy allows dropping segments up to `seg` (the cut is at
        `cut` since step `cut_step`, `cached` or freeze-only; `steps_left` in the run): exactly
        there for exact policies; else among the cuts up to the last one that freezes no more
        parameters, by the step costs (or the smallest activation without a cost model).
        `furthest`: the furthest segment the policy will ever allow (None: unknown); a cut that
        reaches it will stay, so a cache there is not rented first (renting is for a cut that may
        move again)."""
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
        costs = self.step_costs(cut)
        if furthest is not None and last >= furthest:  # the cut will stay: nothing to rent
            rent = math.inf
        elif cut >= 0 and not cached:  # what freeze-only has cost more than a cache, since the cut moved
            rent = (step - cut_step) * max(costs.step_s(cut, cached=False) - costs.step_s(cut), 0.0)
        else:
            rent = 0.0
        return costs.decide(cut, last, steps_left, self.samples, cached=cached, rent=rent)

    def placement(self, cut: int, kept: str | None = None) -> Placement:
        """The format and tier of a cache at `cut` (measured free memory, `cache_memory`); under
        `auto`, a valid cache already there keeps its format `kept` (resume, update)."""
        shape = self.dg.cut_points[cut].shape
        fmt = kept if kept and self.cfg.cache_dtype == "auto" else self.cfg.cache_dtype
        placement = choose_placement(
            lambda f: self.samples * codec(f).sample_bytes(shape),
            self.b.device,
            fmt,
            self.cfg.cache_tier,
            self.b.amp,
            self.cfg.cache_memory,
        )
        if fmt != self.cfg.cache_dtype:
            placement = replace(placement, why=f"{fmt}, as the cache already there was written")
        return placement

    def timed(self, cut: int, step_s: float, wait_s: float) -> None:
        """Steps at `cut` took `step_s` each, `wait_s` of it waiting for batches."""
        if self.costs is not None:
            self.costs.observe(cut, step_s, wait_s)

    def epoch_timed(self, step_s: float, wait_s: float) -> None:
        """The last epoch's seconds per step, and waiting for batches per step: the step costs
        start from them when they are first measured."""
        self.last_epoch = step_s, wait_s

    def built(self, old: int, cut: int, seconds: float) -> None:
        """A cache at `cut` was built in `seconds` from the one at `old` (-1: from the images)."""
        if self.costs is not None:
            self.costs.built(old, cut, self.samples, seconds)

    def to_dict(self) -> dict[str, Any] | None:
        """The step costs' measurements (None: never measured)."""
        return self.costs.to_dict() if self.costs is not None else None

    def step_costs(self, cut: int) -> StepCosts:
        """The run's step costs (the cut is at `cut`), measured when first asked."""
        if self.costs is not None:
            return self.costs
        n = min(self.b.batch_size, len(self.images.indices["train"]))
        x = next(self.images.images("train", torch.arange(n), 0, self.b.batch_size))[0]  # (B, C, H, W)
        folder = str(self.store.root.parent) if self.store.root.parent.is_dir() else None
        placements: dict[int, Placement] = {}
        bandwidths: dict[str, float] = {}

        def placement(k: int) -> Placement:
            if k not in placements:
                placements[k] = self.placement(k)
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
            batches_per_step=self.cfg.grad_accum_steps,  # the driver's steps and timings are optimizer steps
        )
        if self.last_epoch is not None:
            self.costs.observe(cut, *self.last_epoch)
        return self.costs
