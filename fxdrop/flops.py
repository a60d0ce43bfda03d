"""Per-node forward FLOPs and output shapes, measured with torch.utils.flop_counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["NodeStats", "measure_nodes"]


@dataclass(frozen=True)
class NodeStats:
    cum_flops: list[int]  # forward FLOPs of the whole batch up to and including each position
    shapes: list[tuple[int, ...] | None]  # per-sample output shape at each position (None: not a tensor)
    total_flops: int  # forward FLOPs of the whole batch


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.cum: list[int] = []
        self.shapes: list[tuple[int, ...] | None] = []

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.cum.append(self.counter.get_total_flops())
        self.shapes.append(tuple(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() > 0 else None)
        return out


def measure_nodes(gm: fx.GraphModule, example_input: torch.Tensor) -> NodeStats:
    """Run `gm` once on `example_input` (no grad) and record FLOPs and shapes at every node."""
    counter = FlopCounterMode(display=False)
    rec = _Recorder(gm, counter)
    with torch.no_grad(), counter:
        rec.run(example_input)
    return NodeStats(rec.cum, rec.shapes, counter.get_total_flops())
