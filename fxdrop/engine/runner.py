"""The module a driver trains, as it runs: wrapped for DDP and, after its first eager step,
compiled (`Runner`); and the batches of a stretch, timed while the loop waits for them (`timed`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .. import distributed as D
from .dropper import StretchTime

__all__ = ["Runner", "timed"]


def timed(batches: Iterable, stretch: StretchTime) -> Iterator:
    """`batches`, adding the seconds spent waiting for each one to `stretch.waited`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stretch.waited += time.perf_counter() - t0
        yield item


class Runner:
    """The module being trained (`net`: the whole model, later a suffix), wrapped for DDP and,
    after its first eager step, compiled. Rebuilt whenever `net` changes."""

    def __init__(self, net: nn.Module, info: D.DistInfo, device: torch.device, backend: str | None) -> None:
        self.net, self.backend = net, backend
        self.wrapped = D.wrap_ddp(net, info, device)
        self.compiled: nn.Module | None = None

    def __call__(self, x: torch.Tensor) -> Any:
        return (self.compiled if self.compiled is not None else self.wrapped)(x)

    def stepped(self) -> None:
        if self.backend and self.compiled is None:
            # compiled after one eager step, once a new suffix has settled whether it
            # copies its input (split.py); compiled before, dynamo compiles every suffix twice
            self.compiled = torch.compile(self.wrapped, backend=self.backend)
