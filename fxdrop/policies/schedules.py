"""Policies that follow a schedule, not the model: the baseline, fixed drops, FreezeOut."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import Policy, drop_limit, param_segments

__all__ = ["NoDrop", "Fixed", "Schedule", "FreezeOut"]


@dataclass(frozen=True)
class NoDrop(Policy):
    """The baseline: never drops."""

    def target(self, state, epoch, epochs, dropped):
        return dropped, {"rule": "the baseline: it never drops"}


@dataclass(frozen=True)
class Fixed(Policy):
    """Drop everything before cut point `cut` (index, node name or module path) at `epoch`."""

    cut: int | str = 0  # the cut point to drop up to (segment index == cut index)
    epoch: int = 0  # the epoch at whose start the drop happens
    exact = True

    def resolve_cuts(self, state, resolve):
        state["cut_index"] = resolve(self.cut)

    def check(self, epochs):
        if not 0 <= self.epoch < epochs:
            raise ConfigError(
                "epochs",
                f"is {epochs}, so a fixed drop at epoch {self.epoch} would never happen; "
                f"drop at an epoch from 0 to {epochs - 1} or train longer",
            )

    def target(self, state, epoch, epochs, dropped):
        if epoch < self.epoch:
            return dropped, {}
        return max(dropped, state["cut_index"]), {"rule": f"fixed at epoch {self.epoch}"}


@dataclass(frozen=True)
class Schedule(Policy):
    """Drop to given cut points at given epochs: `Schedule(((1, "layer1"), (3, "layer2")))`.

    Replays another run's decisions (the benchmark's freeze-only mode replays LearnDrop's).
    """

    steps: tuple[tuple[int, int | str], ...] = ()  # (epoch, cut) pairs
    exact = True

    def resolve_cuts(self, state, resolve):
        state["cuts"] = [(e, resolve(c)) for e, c in self.steps]

    def target(self, state, epoch, epochs, dropped):
        due = [c for e, c in state["cuts"] if e <= epoch]
        return max([dropped, *due]), {"rule": "schedule"}


@dataclass(frozen=True)
class FreezeOut(Policy):
    """FreezeOut-style schedule (Brock et al. 2017): the i-th of S segments with parameters
    freezes at fraction t_i = t0 + (1 - t0) * (i / S)^3 (cubic) or linearly in i."""

    t0: float = 0.5  # fraction of training at which the first segment freezes
    cubic: bool = True  # cubic schedule (FreezeOut's best) instead of linear
    min_trainable: int = 2  # segments with parameters that always train (the head)

    def target(self, state, epoch, epochs, dropped):
        segs = param_segments(state)
        limit = drop_limit(state, self.min_trainable)
        frac = epoch / max(epochs, 1)
        best = dropped
        for i, s in enumerate(segs):
            ratio = i / len(segs)
            if self.t0 + (1 - self.t0) * (ratio**3 if self.cubic else ratio) <= frac and best < s <= limit:
                best = s
        return best, {"fraction": round(frac, 4)}
