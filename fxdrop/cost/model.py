"""Step costs and the cut decision: what a training step costs at each cut, what building a cache
there costs, and where the cut should go. Measured on this machine, never assumed, and almost free
to consult.

    forward(s)  = seconds of segment s's forward on a batch, and train(s) of its forward and
                  backward, measured once, at the first decision, on a real batch
    step(cut)   = batches_per_step * (correction * sum_{s after cut} train(s) + input(cut))
                  (one optimizer step, which takes batches_per_step batches with gradient
                  accumulation; every other term is per batch)
                  (the backward is measured: on a CPU a convolution on a small feature map takes
                  several times its forward to differentiate, so FLOPs or "backward = 2
                  forwards" mispredict what dropping the front saves)
                  input(-1): waiting for a batch of images (measured from the run's own steps)
                  input(cut): moving the cached activations at the measured bandwidth of their tier
    freeze-only(cut) = correction * (sum_{s after cut} train(s) + sum_{s up to cut} forward(s))
                  + input(-1): no cache, the frozen prefix runs forward on the images every step
    correction  = measured / predicted compute of the run's own steps at the current cut,
                  updated after every stretch of steps at one cut, so each drop's real effect
                  corrects the next decision
    build(a->b) = batches * (correction * sum_{a < s <= b} forward(s) + image wait when a = -1)
                  + bytes written / write rate   (the write rate learned from the builds done:
                  writing a large early activation can cost more than computing it)

A decision is arithmetic over these numbers; it takes microseconds, never a timed step. For
every candidate cut it weighs caching (a faster step, after paying for the build) against
freeze-only (a slower step, nothing to build): in a short run a cache may not repay itself.
A cache from the images is rented first (`decide`): freeze-only until freeze-only has cost as
much as the build, because the cut may move again before the cache repays itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..graph import DropGraph

__all__ = ["StepCosts", "Decision", "MIN_GAIN"]

# a step on this machine varies by a few percent between epochs; a predicted gain smaller
# than that is noise, not a reason to build a cache
MIN_GAIN = 0.05


@dataclass(frozen=True)
class Decision:
    cut: int  # where the cut goes (the current one when the drop is declined)
    why: dict[str, Any]  # the predictions behind it (metrics.json)
    # cache the activations at `cut` (False: freeze-only, recompute the prefix); a decline keeps
    # the current way
    cache: bool = True


@dataclass
class StepCosts:
    """Per-segment step costs of one run, corrected by the run's own steps (module docstring).

    Args:
        dg: the traced model.
        forward_s: `segment_seconds(...)[0]` on a training batch.
        batch_size: the batch that was timed (per rank).
        bandwidth: bytes per second of the tier a cache at cut `k` would live in (measured).
        sample_bytes: stored bytes of one cached sample at cut `k`, in the format its cache would
            be written in (None: fp32).
    """

    dg: DropGraph
    forward_s: list[float]
    batch_size: int
    bandwidth: Callable[[int], float]
    sample_bytes: Callable[[int], int] | None = None
    train_s: list[float] | None = None  # `segment_seconds(...)[1]`; None: 3 x forward
    image_wait_s: float = 0.0  # waiting for a batch of images, per batch (measured while training)
    correction: float = 1.0  # measured / predicted compute at the current cut
    write_bytes_per_s: float = 1e9  # serialising, hashing and writing shards; learned from each build
    # batches an optimizer step takes (gradient accumulation): a step, and the step seconds
    # `observe` is given, are per optimizer step; the segment timings are per batch
    batches_per_step: int = 1
    # (cut, last allowed, unrented caches) -> steps left
    declined: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def compute_s(self, cut: int) -> float:
        """Uncorrected forward + backward seconds of the suffix after `cut` (-1: the whole model)."""
        if self.train_s is not None:
            return sum(self.train_s[cut + 1 :])
        return 3 * sum(self.forward_s[cut + 1 :])

    def input_s(self, cut: int) -> float:
        if cut < 0:
            return self.image_wait_s
        return self._sample_bytes(cut) * self.batch_size / self.bandwidth(cut)

    def step_s(self, cut: int, cached: bool = True) -> float:
        """Predicted seconds of one optimizer step (`batches_per_step` batches) with the cut at
        `cut`, from a cache or (not `cached`) freeze-only."""
        if cut < 0 or cached:
            batch = self.correction * self.compute_s(cut) + self.input_s(cut)
        else:
            prefix_s = sum(self.forward_s[: cut + 1])  # freeze-only: the prefix runs forward too
            batch = self.correction * (self.compute_s(cut) + prefix_s) + self.image_wait_s
        return self.batches_per_step * batch

    def _build_compute_s(self, frm: int, to: int, samples: int) -> float:
        forward = self.correction * sum(self.forward_s[frm + 1 : to + 1])
        return samples / self.batch_size * (forward + (self.image_wait_s if frm < 0 else 0.0))

    def cache_bytes(self, cut: int, samples: int) -> int:
        return samples * self._sample_bytes(cut)

    def _sample_bytes(self, cut: int) -> int:
        return self.sample_bytes(cut) if self.sample_bytes else self.dg.cut_points[cut].bytes_per_sample

    def build_s(self, frm: int, to: int, samples: int) -> float:
        """Predicted seconds of caching `samples` activations at `to` from those at `frm`."""
        return (
            self._build_compute_s(frm, to, samples) + self.cache_bytes(to, samples) / self.write_bytes_per_s
        )

    def built(self, frm: int, to: int, samples: int, seconds: float) -> None:
        """Learn the write rate from a build that took `seconds`: what computing did not explain."""
        writing = seconds - self._build_compute_s(frm, to, samples)
        # at least a tenth of the build is writing (timing noise cannot make it free)
        self.write_bytes_per_s = self.cache_bytes(to, samples) / max(writing, 0.1 * seconds, 1e-6)

    def observe(self, cut: int, step_s: float, wait_s: float) -> None:
        """Correct the predictions with the mean optimizer step and its wait for data measured
        at `cut`."""
        step_s, wait_s = step_s / self.batches_per_step, wait_s / self.batches_per_step  # per batch
        if cut < 0:
            self.image_wait_s = wait_s
        # freeze-only, the frozen prefix runs inside the feed, so its forward is part of
        # the wait for a batch; what remains of the step is the suffix's forward and backward
        compute = self.compute_s(cut)
        if compute > 0 and step_s > wait_s:
            self.correction = (step_s - wait_s) / compute

    def candidates(self, cut: int, last: int) -> list[int]:
        """Cuts after `cut` up to `last`, one per set of frozen parameters (only parameter-free
        segments between them): the one with the smallest activation, the latest on ties."""
        groups: list[list[int]] = []
        for k in range(cut + 1, last + 1):
            if groups and not self.dg.segments[k].param_names:
                groups[-1].append(k)
            else:
                groups.append([k])
        return [min(g, key=lambda k: (self.dg.cut_points[k].bytes_per_sample, -k)) for g in groups]

    def decide(
        self,
        cut: int,
        last: int,
        steps_left: int,
        samples: int,
        cached: bool = True,
        may_cache: bool = True,
        rent: float = 0.0,
    ) -> Decision:
        """Where to move the cut (now at `cut`, from a cache or freeze-only) when the policy allows
        any cut up to `last`: the candidate and way (a cache of `samples` activations, or
        freeze-only) that saves the most time over the `steps_left` steps, builds included; the
        current cut unless that saving is positive and the step at least `MIN_GAIN` faster, so
        no drop makes a step slower.

        A cache built from the images is a bet that the cut stays where it is long enough to repay
        the build; a progressive policy often moves it again within an epoch. So it is rented
        first: freeze-only until `rent` (the seconds freeze-only at the current cut has cost more
        than a cache there would have) reaches the build's cost, then the cache, at the current
        cut or a later one. That never spends more than twice the better of the two choices made
        knowing when the cut will move next; a build from an existing cache (a later cut) costs
        only the segments between and is weighed as it is. A cut that will not move again (the
        policy's furthest) is no bet: `rent` is then `math.inf`, and every cache is weighed on
        the steps left (`rent_s` is then null in metrics.json, which writes no infinities)."""
        cands = self.candidates(cut, last)
        from_images = cut < 0 or not cached
        ways = self._ways(cut, cands, from_images, may_cache)
        if not ways:
            return Decision(cut, {"decision": "no cut after the current one"}, cache=cached)
        build = {(k, c): self.build_s(cut if cached else -1, k, samples) if c else 0.0 for k, c in ways}
        unpaid = [w for w in ways if w[1] and from_images and build[w] > rent]
        ways = [w for w in ways if w not in unpaid]
        memo = (cut, last, len(unpaid))
        if steps_left <= self.declined.get(memo, -1):
            return Decision(
                cut,
                {"decision": "declined before at this cut, with more steps left", "repeat": True},
                cache=cached,
            )
        now = self.step_s(cut, cached)
        if not ways:
            self.declined[memo] = steps_left
            return Decision(cut, self._not_rented_yet(unpaid, build, rent, now), cache=cached)
        best, saving = self._best_way(ways, build, now, steps_left)
        why = {
            "predicted_step_s_before": round(now, 6),
            "predicted_step_s": round(self.step_s(*best), 6),
            "predicted_build_s": round(build[best], 3),
            "predicted_saving_s": round(saving, 3),
            "cache": best[1],
            "candidates": cands,
            "rent_s": round(rent, 3),
        }
        if saving > 0 and self.step_s(*best) < (1 - MIN_GAIN) * now:
            return Decision(best[0], why, cache=best[1])
        self.declined[memo] = steps_left
        return Decision(
            cut, {"decision": "no candidate is faster enough to repay its cache"} | why, cache=cached
        )

    @staticmethod
    def _ways(cut: int, cands: list[int], from_images: bool, may_cache: bool) -> list[tuple[int, bool]]:
        """(cut, cached) pairs to weigh: every candidate cached and freeze-only."""
        ways = [(k, c) for k in cands for c in ((True, False) if may_cache else (False,))]
        if may_cache and from_images and cut >= 0:
            ways.append((cut, True))  # cache the current cut, freeze-only so far
        return ways

    def _best_way(
        self, ways: list[tuple[int, bool]], build: dict[tuple[int, bool], float], now: float, steps_left: int
    ) -> tuple[tuple[int, bool], float]:
        """The way that saves the most seconds over `steps_left` steps, builds included (the
        deeper cut on ties), and that saving."""
        saving = {w: (now - self.step_s(*w)) * steps_left - build[w] for w in ways}
        best = max(ways, key=lambda w: (saving[w], w[0]))
        return best, saving[best]

    def _not_rented_yet(
        self,
        unpaid: list[tuple[int, bool]],
        build: dict[tuple[int, bool], float],
        rent: float,
        now: float,
    ) -> dict[str, Any]:
        """Why no way is taken while every cache from the images costs more than the rent paid."""
        waits = min(unpaid, key=lambda w: build[w])
        return {
            "decision": "a cache is not rented long enough yet",
            "rent_s": round(rent, 3),
            "predicted_build_s": round(build[waits], 3),
            "predicted_step_s_before": round(now, 6),
            "predicted_step_s": round(self.step_s(*waits), 6),
        }

    def to_dict(self) -> dict[str, Any]:
        """The measurements (metrics.json)."""
        return {
            "batch_size": self.batch_size,
            "batches_per_step": self.batches_per_step,
            "image_wait_s": round(self.image_wait_s, 6),
            "correction": round(self.correction, 4),
            "write_bytes_per_s": round(self.write_bytes_per_s),
            "segment_forward_s": [round(s, 7) for s in self.forward_s],
            "segment_train_s": [round(s, 7) for s in self.train_s] if self.train_s else None,
            "predicted_step_s": {
                str(k): round(self.step_s(k), 6) for k in range(-1, len(self.dg.cut_points))
            },
            "predicted_freeze_only_step_s": {
                str(k): round(self.step_s(k, cached=False), 6) for k in range(len(self.dg.cut_points))
            },
        }
