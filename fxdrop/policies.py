"""Drop policies: they decide how far the cut may advance. One engine runs them all.

A policy sees the model every `interval` (a fraction of an epoch) through `observe`, and at the
start of every epoch answers `target(...)`: the index of the furthest *segment* it would drop
(`-1`: none). The engine turns that into a cut point and applies it; the cut only moves forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import FxdropError

__all__ = ["Policy", "LearnDrop", "FreezeOut", "Fixed", "Schedule", "NoDrop", "parse_policy"]


class Policy:
    """Base class. Subclasses are frozen dataclasses of constants; a run's state is a dict the
    engine holds (and checkpoints) and passes back in."""

    interval: float = 1.0  # epochs between observations

    def init_state(self, segments: list[list[str]]) -> dict[str, Any]:
        """A run's starting state. `segments[s]` are the parameter names of segment s."""
        return {"segments": segments}

    def observe(self, state: dict[str, Any], model: nn.Module, lr: float = 1.0) -> dict[str, Any]:
        """Called every `interval` with the interval's mean learning rate; returns its scores."""
        return {}

    def target(self, state: dict[str, Any], epoch: int, epochs: int, dropped: int) -> tuple[int, dict[str, Any]]:
        """The furthest segment to drop before `epoch` (-1: none; `dropped`: the current one), and why."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__} | asdict(self)

    #: True for policies that name exact cut points: the engine takes them as they are, instead
    #: of choosing among equivalent cuts with the cost model.
    exact = False

    def resolve_cuts(self, state: dict[str, Any], resolve: Callable[[int | str], int]) -> None:
        """Turn the cut names this policy was given into indices (`resolve` raises CutPointError)."""


def _param_segments(state: dict[str, Any]) -> list[int]:
    return [s for s, names in enumerate(state["segments"]) if names]


def _limit(state: dict[str, Any], min_trainable: int) -> int:
    """The furthest segment that may be dropped, leaving `min_trainable` segments with parameters."""
    with_params = _param_segments(state)
    if len(with_params) <= min_trainable:
        return -1
    return with_params[-min_trainable] - 1


@dataclass(frozen=True)
class NoDrop(Policy):
    """The baseline: never drops."""

    def target(self, state, epoch, epochs, dropped):
        return dropped, {}


@dataclass(frozen=True)
class Fixed(Policy):
    """Drop everything before cut point `cut` (index, node name or module path) at `epoch`."""

    cut: int | str = 0  # the cut point to drop up to (segment index == cut index)
    epoch: int = 0  # the epoch at whose start the drop happens
    exact = True

    def resolve_cuts(self, state, resolve):
        state["cut_index"] = resolve(self.cut)

    def target(self, state, epoch, epochs, dropped):
        if epoch < self.epoch:
            return dropped, {}
        return max(dropped, state["cut_index"]), {"rule": f"fixed at epoch {self.epoch}"}


@dataclass(frozen=True)
class Schedule(Policy):
    """Drop to given cut points at given epochs: `Schedule(((1, "layer1"), (3, "layer2")))`.

    Replays another run's decisions (the benchmark's freeze-only mode uses fxdrop's own).
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
        segs = _param_segments(state)
        limit = _limit(state, self.min_trainable)
        frac = epoch / max(epochs, 1)
        best = dropped
        for i, s in enumerate(segs):
            ratio = i / len(segs)
            if self.t0 + (1 - self.t0) * (ratio**3 if self.cubic else ratio) <= frac and best < s <= limit:
                best = s
        return best, {"fraction": round(frac, 4)}


@dataclass(frozen=True)
class LearnDrop(Policy):
    """Learn&Drop scores (our reading of Cruciata et al. 2024; see DESIGN.md).

    Per segment s with parameters, every `interval` epochs:
    change `c_s = ||θ_s(t) - θ_s(t-1)|| / (||θ_s(t-1)|| + eps)`, slowdown `r_s = c_s / max c_s`,
    continuation = slope of `log c_s` over the last `window` observations. The front segments
    may be dropped while each has `r_s < tau` and a negative slope, after `warmup` observations.
    """

    interval: float = 0.25  # epochs between observations; 4 per epoch lets short fine-tunes drop
    tau: float = 0.5  # a segment whose change fell below tau x its peak is settling
    window: int = 3  # observations in the slope fit (continuation score)
    warmup: int = 4  # observations before any drop (one epoch at the default interval)
    min_trainable: int = 2  # segments with parameters that always train (the head)
    eps: float = 1e-12  # guards the relative change of all-zero parameters
    per_lr: bool = False  # divide c_s by the interval's mean learning rate (the LR decay is then
    #                       not read as settling); off: on ResNet-18/Fashion-MNIST it dropped almost
    #                       nothing in 4 epochs at the same accuracy (docs/benchmarks.md)

    def init_state(self, segments):
        state = super().init_state(segments)
        state.update(history={s: [] for s in _param_segments(state)}, observations=0, snapshot=None)
        return state

    def observe(self, state, model, lr=1.0):
        params = dict(model.named_parameters())
        now = {
            s: torch.cat([params[n].detach().reshape(-1).float() for n in state["segments"][s]]).clone()
            for s in _param_segments(state)
            if params[state["segments"][s][0]].requires_grad  # reason: dropped segments are final
        }
        prev, state["snapshot"] = state["snapshot"], now
        if prev is None:
            return {}
        state["observations"] += 1
        scale = lr if self.per_lr else 1.0
        scores = {}
        for s, theta in now.items():
            if s in prev:
                norm = torch.linalg.vector_norm(prev[s]) + self.eps
                scores[s] = (torch.linalg.vector_norm(theta - prev[s]) / norm).item() / max(scale, self.eps)
                state["history"][s].append(scores[s])
        return {"change": scores}

    def scores(self, state: dict[str, Any], s: int) -> tuple[float, float]:
        """(slowdown r_s, slope of log c_s) of segment s; (inf, inf) before enough observations."""
        h = state["history"][s]
        if len(h) < self.window or max(h) <= 0:
            return math.inf, math.inf
        ys = [math.log(max(c, self.eps)) for c in h[-self.window :]]
        xm, ym = (len(ys) - 1) / 2, sum(ys) / len(ys)
        slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(len(ys)))
        return h[-1] / max(h), slope

    def target(self, state, epoch, epochs, dropped):
        if state["observations"] < self.warmup:
            return dropped, {"rule": "warmup"}
        limit = _limit(state, self.min_trainable)
        best, why = dropped, {}
        for s in _param_segments(state):
            if s <= dropped:
                continue
            r, slope = self.scores(state, s)
            if s > limit or not (r < self.tau and slope < 0):
                break
            why[str(s)] = {"r": round(r, 4), "slope": round(slope, 4)}
            best = s
        return best, {"scores": why}


def parse_policy(text: str) -> Policy:
    """Parse the CLI's `--policy`: learn-drop | freezeout | none | fixed:CUT@EPOCH."""
    if text in ("learn-drop", "learndrop"):
        return LearnDrop()
    if text == "freezeout":
        return FreezeOut()
    if text in ("none", "nodrop"):
        return NoDrop()
    if text.startswith("fixed:"):
        spec = text[len("fixed:") :]
        cut, _, epoch = spec.partition("@")
        try:
            return Fixed(int(cut) if cut.lstrip("-").isdigit() else cut, int(epoch or 0))
        except ValueError:
            pass
    raise FxdropError(f"unknown policy '{text}'; use learn-drop, freezeout, none or fixed:CUT@EPOCH (e.g. fixed:layer2@1)")
