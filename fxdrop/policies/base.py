"""The policy protocol: how far the cut may advance. One engine runs every policy.

A policy sees the model every `interval` (a fraction of an epoch) through `observe`, the end of
every epoch through `epoch_end`, and before every epoch answers `target(...)`: the index of the
furthest *segment* it would drop (`-1`: none). The engine turns that into a cut point, lets the
step costs decide whether it pays, and applies it; the cut only moves forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from torch import nn

__all__ = ["Policy", "param_segments", "drop_limit"]


class Policy:
    """Base class. Subclasses are frozen dataclasses of constants; a run's state is a dict the
    engine holds (and checkpoints) and passes back in."""

    interval: float = 1.0  # epochs between observations

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

    def epoch_end(
        self, state: dict[str, Any], record: dict[str, Any], drop: dict[str, Any] | None = None
    ) -> None:
        """Called after each epoch with its metrics record (`val_acc`, ...) and the drop event
        taken before it, if any (with `hurt` once validation judged it)."""

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
        (whose weights the checkpoint holds too) by `restore_state`."""
        return state

    def restore_state(self, saved: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """The state `checkpoint_state` kept, made whole again with the restored `model`."""
        return saved

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__} | asdict(self)


def param_segments(state: dict[str, Any]) -> list[int]:
    """Indices of the segments that hold parameters."""
    return [s for s, names in enumerate(state["segments"]) if names]


def drop_limit(state: dict[str, Any], min_trainable: int) -> int:
    """The furthest segment that may be dropped, leaving `min_trainable` segments with parameters."""
    with_params = param_segments(state)
    if len(with_params) <= min_trainable:
        return -1
    return with_params[-min_trainable] - 1
