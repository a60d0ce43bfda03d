"""Landing: a segment's learning rate annealed to zero before it freezes.

A segment frozen at the run's learning rate is frozen wherever the last minibatches left it,
mid-bounce. A landing segment instead follows a cosine from its rate at the landing's start down
to zero at its end (FreezeOut's per-layer schedule, Brock et al. 2017), so it is frozen where its
own descent ended. The other segments keep the run's schedule.

The rate is scaled by interpolating each landing parameter between its value before and after the
optimizer step: `p = p_before + m * (p_after - p_before)`. For SGD (momentum, Nesterov, weight
decay) and Adam/AdamW every term of a step is proportional to the learning rate, so this is the
step taken at `m` times the rate, whatever the optimizer's groups, and the optimizer's state
(momentum, moments) stays as it would be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Landing", "Landings"]


@dataclass(frozen=True)
class Landing:
    """One segment's landing: from optimizer step `start` (its rate then `rate0` times the base
    rate) down to zero at step `end`, along a cosine."""

    start: int
    end: int
    rate0: float  # the segment's rate at `start`, as a multiple of the base learning rate
    planned: bool = False  # planned by the policy from the start (FreezeOut): never cancelled

    def rate(self, step: int) -> float:
        """The segment's rate at `step`, as a multiple of the base rate."""
        if step <= self.start:
            return self.rate0
        if step >= self.end:
            return 0.0
        return self.rate0 * 0.5 * (1 + math.cos(math.pi * (step - self.start) / (self.end - self.start)))


class Landings:
    """The landings of a run, by segment, and the step that applies them.

    Args:
        model: the model whose segments land.
        segments: the parameter names of each segment.
        schedule: the run's rate at a step as a multiple of the base rate (the scheduler's factor);
            None: unknown, and a landing multiplies whatever the run's rate is.
    """

    def __init__(
        self, model: nn.Module, segments: list[list[str]], schedule: Callable[[int], float] | None
    ) -> None:
        self.params = dict(model.named_parameters())
        self.segments, self.schedule = segments, schedule
        self.by_segment: dict[int, Landing] = {}

    def start(self, segs: list[int], step: int, steps: int) -> list[int]:
        """Land the segments `segs` (those not landing yet) from `step` over `steps` steps;
        returns the segments that started."""
        rate0 = self.schedule(step) if self.schedule else 1.0
        new = [s for s in segs if s not in self.by_segment]
        for s in new:
            self.by_segment[s] = Landing(step, step + max(1, steps), rate0)
        return new

    def plan(self, planned: dict[int, tuple[int, int]]) -> None:
        """Landings a policy plans when the run starts: `{segment: (start, end)}`, each from the
        run's rate at its start (from the base rate for a landing from the first step, as
        FreezeOut's: the warm-up is not its starting rate)."""
        for s, (a, b) in planned.items():
            rate0 = self.schedule(a) if a > 0 and self.schedule else 1.0
            self.by_segment[s] = Landing(a, max(b, a + 1), rate0, planned=True)

    def cancel(self, beyond: int, step: int) -> list[int]:
        """Landings of segments after `beyond` that have not ended go back to the run's rate."""
        gone = [
            s for s, land in self.by_segment.items() if s > beyond and land.end > step and not land.planned
        ]
        for s in gone:
            del self.by_segment[s]
        return gone

    def landed(self, upto: int, step: int, after: int = -1) -> int:
        """The furthest segment s <= `upto` such that every segment with parameters from
        `after` + 1 (the ones before are dropped already) up to s has landed by `step` (`after`:
        none); segments without parameters go with the next one."""
        best = after
        for s in range(after + 1, upto + 1):
            if not self.segments[s]:
                continue
            land = self.by_segment.get(s)
            if land is None or land.end > step:
                return best
            best = s
        return upto

    def ends_at(self, step: int) -> bool:
        """Whether a landing ends at `step` (the driver asks for a decision then)."""
        return any(land.end == step for land in self.by_segment.values())

    def multiplier(self, s: int, step: int) -> float:
        """Segment s's rate at `step` over the run's: 1 for a segment not landing."""
        land = self.by_segment.get(s)
        if land is None or step < land.start:
            return 1.0
        target = land.rate(step)
        if self.schedule is None:
            return target / land.rate0 if land.rate0 > 0 else 0.0
        run = self.schedule(step)
        return min(1.0, target / run) if run > 0 else 0.0

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around optimizer step `step` (0-based over the run): the landing segments' parameters
        move by their multiplier's share of the step."""
        taken = self.before(step)
        yield
        self.after(taken)

    def before(self, step: int) -> list[tuple[nn.Parameter, float, torch.Tensor]]:
        """Right before optimizer step `step`: each scaled landing parameter, its multiplier and
        its value now, for `after` (`step` split in two, for a driver whose step happens between
        two hooks, as Lightning's)."""
        return [
            (p, m, p.detach().clone())
            for s in self.by_segment
            if (m := self.multiplier(s, step)) < 1.0
            for p in (self.params[n] for n in self.segments[s])
            if p.requires_grad
        ]

    def after(self, taken: list[tuple[nn.Parameter, float, torch.Tensor]]) -> None:
        """Right after the step `before` saw: each parameter moves by its multiplier's share."""
        with torch.no_grad():
            for p, m, b in taken:
                p.copy_(torch.lerp(b, p, m))  # b + m * (p - b)

    def state_dict(self) -> dict[str, list[float]]:
        return {
            str(s): [land.start, land.end, land.rate0, int(land.planned)]
            for s, land in self.by_segment.items()
        }

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.by_segment = {
            int(s): Landing(int(a), int(b), float(r), bool(p)) for s, (a, b, r, p) in state.items()
        }
