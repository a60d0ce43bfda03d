"""The policy protocol: how far the cut may advance. One engine runs every policy.

A policy sees the model every `interval` (a fraction of an epoch) through `observe`, the end of
every epoch through `epoch_end`, and answers `target(...)` whenever the driver asks (at every
epoch start, after an observation, when a landing ends): the index of the furthest *segment* it
would drop (`-1`: none). The engine lands what it newly names (the segments' learning rate
anneals to zero, `FitConfig.landing`), or follows the landings it planned (`landings`), turns the
landed segments into a cut point, lets the step costs decide whether it pays, and applies it; the
cut only moves forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from torch import nn

from ..records import Drop, Epoch

__all__ = ["Policy", "param_segments", "drop_limit", "land_before"]


class Policy:
    """Base class. Subclasses are frozen dataclasses of constants; a run's state is a dict the
    engine holds (and checkpoints) and passes back in."""

    interval: float = 1.0  # epochs between observations

    #: True when the engine lands what `target` newly names (the drop follows the landing);
    #: policies that know their drops in advance plan their landings instead (`landings`).
    lands = True

    #: True for policies that name exact cut points: the engine takes them as they are, instead
    #: of choosing among equivalent cuts with the step costs.
    exact = False

    def init_state(self, segments: list[list[str]]) -> dict[str, Any]:
        """A run's starting state. `segments[s]` are the parameter names of segment s."""
        return {"segments": segments}

    def resolve_cuts(self, state: dict[str, Any], resolve: Callable[[int | str], int]) -> None:
        """Turn the cut names this policy was given into indices (`resolve` raises CutPointError)."""

    def check(self, epochs: int) -> None:
        """Refuse settings that cannot happen in a run of `epochs` epochs (a ConfigError)."""

    def begin(self, state: dict[str, Any], model: nn.Module) -> None:
        """Called once when a run starts training (not when it resumes), before its first step."""

    def furthest(self, state: dict[str, Any]) -> int | None:
        """The furthest segment this policy will ever allow dropping (None: not known). A cut
        there moves no more, so a cache at it is no bet on how long the cut stays."""
        return None

    def landings(
        self, state: dict[str, Any], steps_per_epoch: int, total_steps: int, landing_steps: int
    ) -> dict[int, tuple[int, int]]:
        """Landings planned when a run starts, for policies that know their drops in advance
        (FreezeOut's per-segment schedule; a fixed drop lands over the `landing_steps` before its
        epoch): `{segment: (first step, step at which its rate reaches zero)}`. None by default:
        the engine lands what `target` names when it names it, and the drop follows."""
        return {}

    def plan(self, state: dict[str, Any], lr_left: float) -> None:
        """Called before every `target` with the learning rate still to come: the sum of the
        scheduled learning rates over the run's remaining steps, divided by its steps per epoch
        (LR-epochs; at a constant rate `lr`, `lr` times the epochs left)."""

    def observe(
        self, state: dict[str, Any], model: nn.Module, lr: float = 1.0, loss: float | None = None
    ) -> dict[str, Any]:
        """Called every `interval`, right after an optimizer step (gradients are still there), with
        the interval's mean learning rate and training loss; returns its scores."""
        return {}

    def epoch_end(self, state: dict[str, Any], record: Epoch, drop: Drop | None = None) -> None:
        """Called after each epoch with its record (`record.val_acc`, ...) and the drop taken
        in it, if any (`drop.hurt` once validation judged it; None: not yet)."""

    def target(
        self, state: dict[str, Any], epoch: int, epochs: int, dropped: int
    ) -> tuple[int, dict[str, Any]]:
        """The furthest segment to drop before `epoch` (-1: none; `dropped`: the current one), and why."""
        raise NotImplementedError

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        """The observations behind the decisions, for metrics.json."""
        return {}

    def reason(self, why: dict[str, Any], name: Callable[[int], str]) -> str:
        """One line: why `target` answered as it did with `why` (its second value), segments
        named by `name` (the module a segment ends with)."""
        return str(why.get("rule") or "the policy allowed no drop")

    def checkpoint_state(self, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """What of `state` a checkpoint keeps: all of it unless part can be rebuilt from `model`
        (whose weights the checkpoint holds too) by `restore_state`. Plain data only: tensors,
        numbers, strings, None, lists, tuples and dicts (a checkpoint is read weights-only; a
        numpy array or a dataclass is refused when the checkpoint is written)."""
        return state

    def restore_state(self, saved: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """The state `checkpoint_state` kept, made whole again with the restored `model`."""
        return saved

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__} | asdict(self)


def land_before(
    state: dict[str, Any], drops: list[tuple[int, int]], steps_per_epoch: int, landing_steps: int
) -> dict[int, tuple[int, int]]:
    """Landings that end when drops known in advance happen: for each (epoch, cut index), the
    segments with parameters up to the cut not landing already, over the `landing_steps` before
    that epoch (none for a drop before the first step)."""
    out: dict[int, tuple[int, int]] = {}
    for epoch, cut in sorted(drops):
        end = epoch * steps_per_epoch
        if landing_steps <= 0 or end <= 0:
            continue
        for s in param_segments(state):
            if s <= cut and s not in out:
                out[s] = (max(0, end - landing_steps), end)
    return out


def param_segments(state: dict[str, Any]) -> list[int]:
    """Indices of the segments that hold parameters."""
    return [s for s, names in enumerate(state["segments"]) if names]


def drop_limit(state: dict[str, Any], min_trainable: int) -> int:
    """The furthest segment that may be dropped, leaving `min_trainable` segments with parameters."""
    with_params = param_segments(state)
    if len(with_params) <= min_trainable:
        return -1
    return with_params[-min_trainable] - 1
