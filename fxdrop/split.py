"""Modules that run one range of a traced graph, sharing the original model's tensors."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

__all__ = ["build_range", "GraphPiece"]


def build_range(gm: fx.GraphModule, start: int | None, end: int | None) -> fx.GraphModule:
    """A GraphModule computing nodes `(start, end]` of `gm`.

    Its one input is the value live across position `start` (the model input when None); its
    output is the value live across `end` (the model output when None). No dead-code elimination
    runs, so in-place operations whose result is unused are kept. The GraphModule refers to the
    same submodules, parameters and buffers as `gm`: nothing is copied.
    """
    nodes = list(gm.graph.nodes)
    out_node = nodes[-1]
    assert out_node.op == "output"

    index = {n: i for i, n in enumerate(nodes)}

    def live_at(pos: int) -> fx.Node:
        live = [n for n in nodes[: pos + 1] if n.op != "get_attr" and any(index[u] > pos for u in n.users)]
        assert len(live) == 1, f"position {pos} is not a cut point"
        return live[0]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    first = 0
    if start is None:
        src_input = next(n for n in nodes if n.op == "placeholder")
    else:
        src_input = live_at(start)
        first = start + 1
    env[src_input] = graph.placeholder("x")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            # get_attr nodes may sit before the range; they fetch shared tensors
            assert n.op == "get_attr", f"{n.name} is used across the cut"
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    last = len(nodes) - 2 if end is None else end
    for n in nodes[first : last + 1]:
        if n.op == "placeholder" or n in env:
            continue
        env[n] = graph.node_copy(n, lookup)
    if end is None:
        graph.output(fx.map_arg(out_node.args[0], lookup))
    else:
        graph.output(lookup(live_at(end)))
    graph.lint()
    return fx.GraphModule(gm, graph, gm.__class__.__name__)


class GraphPiece(nn.Module):
    """One range of the model: frozen (always eval) or trainable (train graph in train mode).

    The first call in each mode runs the range on a copy of its input and checks the copy's
    version counter: a range that writes to its input in place (a first `ReLU(inplace=True)`)
    keeps copying its input, so a cached activation is never corrupted; one that doesn't gets
    the input as is from then on.

    Args:
        eval_gm: the range of the eval-mode graph.
        train_gm: the range of the train-mode graph; None for a frozen piece.
    """

    def __init__(self, eval_gm: fx.GraphModule, train_gm: fx.GraphModule | None = None) -> None:
        super().__init__()
        self.eval_gm = eval_gm
        self.train_gm = train_gm
        self.frozen = train_gm is None
        self._mutates: dict[bool, bool] = {}  # per mode: does the range write to its input?
        if self.frozen:
            self._own = [m for m in eval_gm.modules() if m is not eval_gm]
            super().train(False)

    def train(self, mode: bool = True) -> "GraphPiece":
        # a frozen piece always runs on running statistics, without dropout
        return super().train(False if self.frozen else mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            # the modules are shared with the user's model, whose .train() reaches them too
            for m in self._own:
                if m.training:
                    m.training = False
        mode = self.training and not self.frozen
        gm = self.train_gm if mode else self.eval_gm
        mutates = self._mutates.get(mode)
        if mutates is False:
            return gm(x)
        x = x.clone()
        if mutates is None and not x.is_inference():
            version = x._version
            out = gm(x)
            self._mutates[mode] = x._version != version
            return out
        return gm(x)
