"""Policies that follow a schedule, not the model: the baseline, fixed drops, FreezeOut."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import Policy, drop_limit, land_before, param_segments

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
    lands = False  # its landing is planned to end at `epoch`

    def resolve_cuts(self, state, resolve):
        state["cut_index"] = resolve(self.cut)

    def check(self, epochs):
        if not 0 <= self.epoch < epochs:
            raise ConfigError(
                "epochs",
                f"is {epochs}, so a fixed drop at epoch {self.epoch} would never happen; "
                f"drop at an epoch from 0 to {epochs - 1} or train longer",
            )

    def landings(self, state, steps_per_epoch, total_steps, landing_steps):
        return land_before(state, [(self.epoch, state["cut_index"])], steps_per_epoch, landing_steps)

    def target(self, state, epoch, epochs, dropped):
        cut = state["cut_index"]
        why = {"fixed_cut": cut, "done_before": dropped >= cut}
        if epoch < self.epoch:
            return dropped, why
        return max(dropped, cut), why | {"rule": f"fixed at epoch {self.epoch}"}

    def reason(self, why, name):
        if "fixed_cut" not in why:
            return super().reason(why, name)
        drop = f"the fixed drop after {name(why['fixed_cut'])}, due after {self.epoch} epochs,"
        if why["done_before"]:  # an update of a run that made it
            return f"{drop} was made before"
        return f"{drop} was allowed" if why.get("rule") else f"{drop} had not come"


@dataclass(frozen=True)
class Schedule(Policy):
    """Drop to given cut points at given epochs: `Schedule(((1, "layer1"), (3, "layer2")))`.

    Replays another run's decisions (the benchmark's freeze-only mode replays LearnDrop's).
    """

    steps: tuple[tuple[int, int | str], ...] = ()  # (epoch, cut) pairs
    exact = True
    lands = False  # its landings are planned to end at each epoch

    def resolve_cuts(self, state, resolve):
        state["cuts"] = [(e, resolve(c)) for e, c in self.steps]

    def landings(self, state, steps_per_epoch, total_steps, landing_steps):
        return land_before(state, state["cuts"], steps_per_epoch, landing_steps)

    def target(self, state, epoch, epochs, dropped):
        due = [c for e, c in state["cuts"] if e <= epoch]
        return max([dropped, *due]), {"rule": "schedule"}


@dataclass(frozen=True)
class FreezeOut(Policy):
    """FreezeOut (Brock et al. 2017): the i-th of S segments with parameters freezes at fraction
    t_i = t0 + (1 - t0) * (i / S)^3 (cubic) or linearly in i of the run, its learning rate
    annealed from the start along its own cosine to zero at t_i (the paper's method). With
    `land=False`, the schedule only: each segment freezes at t_i at the run's learning rate."""

    t0: float = 0.5  # fraction of training at which the first segment freezes
    cubic: bool = True  # cubic schedule (FreezeOut's best) instead of linear
    min_trainable: int = 2  # segments with parameters that always train (the head)
    land: bool = True  # per-segment cosine annealing to each freeze (False: the schedule only)

    lands = False  # it plans its landings from the start (or, with `land=False`, has none)

    def freeze_at(self, state) -> dict[int, float]:
        """The fraction of the run at which each droppable segment freezes."""
        segs, limit = param_segments(state), drop_limit(state, self.min_trainable)
        ratios = {s: i / len(segs) for i, s in enumerate(segs) if s <= limit}
        return {s: self.t0 + (1 - self.t0) * (r**3 if self.cubic else r) for s, r in ratios.items()}

    def landings(self, state, steps_per_epoch, total_steps, landing_steps):
        if not self.land:
            return {}
        return {s: (0, round(t * total_steps)) for s, t in self.freeze_at(state).items()}

    def target(self, state, epoch, epochs, dropped):
        if self.land:  # reason: the engine drops each segment when its landing ends
            return max([dropped, *self.freeze_at(state)]), {"rule": "landing per segment"}
        frac = epoch / max(epochs, 1)
        due = [s for s, t in self.freeze_at(state).items() if t <= frac]
        return max([dropped, *due]), {"fraction": round(frac, 4)}
