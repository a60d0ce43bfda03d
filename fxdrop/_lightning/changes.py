"""What `LayerDropping` changes on the user's objects, and how each is put back: the model's
forward (the suffix's while it trains), every parameter's `requires_grad`, every module's mode,
each optimizer group's parameters; and a checkpoint's optimizer state, which names every
parameter as found so that a fresh optimizer of the module loads it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class _SuffixForward:
    """`module.<attr>`'s forward while a suffix trains: the suffix, in the model's mode (Lightning
    switches the model, which does not hold the suffix, between train and eval)."""

    def __init__(self, model: nn.Module, suffix: nn.Module) -> None:
        self.model, self.suffix = model, suffix

    def __call__(self, x: torch.Tensor) -> Any:
        # only the suffix's own flag: its submodules are the model's, in the modes the user left
        self.suffix.training = self.model.training
        return self.suffix(x)


class _Found:
    """What a fit changes on the user's model and optimizers, as it was found: the forward, every
    parameter's `requires_grad`, every module's mode, each optimizer group's parameters."""

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.model = model
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.groups = [(opt, [list(g["params"]) for g in opt.param_groups]) for opt in optimizers]

    def restore(self) -> None:
        self.model.__dict__.pop("forward", None)  # the whole model again
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode
        for opt, groups in self.groups:
            for group, params in zip(opt.param_groups, groups):
                group["params"] = params  # the frozen ones again, without state


def _with_every_parameter(
    state: dict[str, Any], full: list[list[nn.Parameter]], groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """An optimizer's `state_dict()` whose param groups name every parameter of `full` (the groups
    before any drop), the frozen ones without state. The state's parameter ids are positions in
    the groups taken in order, so they are renumbered."""
    current = [p for g in groups for p in g["params"]]  # position = the id in `state`
    position = {id(p): i for i, p in enumerate(current)}
    out_groups, out_state, new_id = [], {}, 0
    for saved, params in zip(state["param_groups"], full):
        ids = []
        for p in params:
            old = position.get(id(p))
            if old is not None and old in state["state"]:
                out_state[new_id] = state["state"][old]
            ids.append(new_id)
            new_id += 1
        out_groups.append(saved | {"params": ids})
    return {"state": out_state, "param_groups": out_groups}
