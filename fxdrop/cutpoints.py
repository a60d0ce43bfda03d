"""Find the places where a traced graph is a chain: one value carries everything forward.

Positions are indices into `list(graph.nodes)`. A cut at position p puts nodes `[0, p]` in the
prefix and the rest in the suffix; it is a cut point when exactly one value produced at or before
p (parameters and buffers fetched by `get_attr` don't count) is used after p.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .tracing import SCOPE_KEY

__all__ = ["RawCut", "find_raw_cuts", "graph_keys", "module_name_at", "tensor_uses"]


@dataclass(frozen=True)
class RawCut:
    pos: int  # last node position of the prefix
    node: fx.Node  # the one value live across the cut


def _last_use(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    index = {n: i for i, n in enumerate(nodes)}
    return {n: max((index[u] for u in n.users), default=-1) for n in nodes}


def find_raw_cuts(gm: fx.GraphModule) -> list[RawCut]:
    """Every non-trivial position with exactly one live value, consecutive repeats collapsed."""
    nodes = list(gm.graph.nodes)
    last_use = _last_use(nodes)
    live: set[fx.Node] = set()
    expiring: dict[int, list[fx.Node]] = defaultdict(list)
    cuts: list[RawCut] = []
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op != "get_attr" and last_use[node] > i:
            live.add(node)
            expiring[last_use[node]].append(node)
        for dead in expiring.pop(i, ()):
            live.discard(dead)
        if len(live) != 1:
            continue
        (value,) = live
        if value.op == "placeholder":
            continue  # the input itself; an empty prefix is no cut
        if all(u.op == "output" for u in value.users):
            continue  # the output itself; an empty suffix is no cut
        if cuts and cuts[-1].node is value:
            continue  # same live value as the previous position
        cuts.append(RawCut(i, value))
    return cuts


def node_key(node: fx.Node, counts: dict) -> tuple:
    """A name for a node that is the same in the train and the eval graph of one model."""
    base = (node.meta.get(SCOPE_KEY, ()), node.op, str(node.target))
    counts[base] = counts.get(base, -1) + 1
    return base + (counts[base],)


def graph_keys(gm: fx.GraphModule) -> dict[tuple, fx.Node]:
    counts: dict = {}
    return {node_key(n, counts): n for n in gm.graph.nodes}


def _paths(node: fx.Node) -> tuple[str, ...]:
    scope = node.meta.get(SCOPE_KEY, ())
    return scope + ((node.target,) if node.op == "call_module" else ())


def module_name_at(gm: fx.GraphModule) -> dict[int, str]:
    """For each position, the outermost module that produced its node and is finished there;
    when none is finished (a residual add before the block's last activation), the innermost
    module the node was created in."""
    nodes = list(gm.graph.nodes)
    last_pos: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for path in _paths(n):
            last_pos[path] = i
    names = {}
    for i, n in enumerate(nodes):
        done = [p for p in _paths(n) if last_pos[p] <= i]
        names[i] = done[0] if done else (_paths(n)[-1] if _paths(n) else "")
    return names


def tensor_uses(gm: fx.GraphModule, model: nn.Module) -> dict[int, list[int]]:
    """Positions at which each parameter or buffer (keyed by `id`) is used in `gm`."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    uses: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        if n.op == "get_attr":
            try:
                obj = gm.get_parameter(n.target)
            except AttributeError:
                try:
                    obj = gm.get_buffer(n.target)
                except AttributeError:
                    continue  # a constant tensor attribute fx created, not a model tensor
            uses[id(obj)].extend(index[u] for u in n.users)
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            for t in list(mod.parameters()) + list(mod.buffers()):
                uses[id(t)].append(i)
    return uses
