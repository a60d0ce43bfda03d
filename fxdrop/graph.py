"""DropGraph: a traced model with its cut points and segments, and the split at a cut point."""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ._state import preserve_modes
from .cutpoints import find_raw_cuts, graph_keys, module_name_at, tensor_uses
from .errors import CutPointError
from .flops import NodeStats, measure_nodes
from .messages import Entry
from .split import GraphPiece, build_range
from .tracing import SCOPE_KEY, trace_graphs

__all__ = ["CutPoint", "Segment", "DropGraph", "trace", "frozen_modules"]

_INSPECT = Entry("inspection.inspect_model", command="inspect")  # what lists a model's cut points


@dataclass(frozen=True)
class CutPoint:
    """A place where one tensor carries everything forward. Sizes and FLOPs are per sample."""

    index: int  # position in DropGraph.cut_points
    name: str  # fx node name of the cut value (eval graph)
    module: str  # outermost module finished here that produced the value ('' for top level)
    shape: tuple[int, ...]  # per-sample shape of the cut value
    bytes_per_sample: int  # fp32 bytes of the cut value per sample
    prefix_flops: int  # forward FLOPs per sample of input -> cut
    suffix_flops: int  # forward FLOPs per sample of cut -> output
    prefix_params: int  # parameter elements frozen by dropping here
    suffix_params: int  # parameter elements still trainable after dropping here
    eval_pos: int = field(default=-1, repr=False)  # node position in the eval graph
    train_pos: int = field(default=-1, repr=False)  # node position in the train graph

    @property
    def prefix_flops_fraction(self) -> float:
        total = self.prefix_flops + self.suffix_flops
        return self.prefix_flops / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["eval_pos"], d["train_pos"]
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class Segment:
    """The nodes between two consecutive cut points; the unit that is scored and dropped."""

    index: int
    param_names: tuple[str, ...]  # names as in model.named_parameters()
    num_params: int  # parameter elements


class DropGraph:
    """A model traced in train and eval mode, with cut points valid in both.

    Build one with :func:`trace`. The graphs share the model's parameters and buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        train_gm: fx.GraphModule,
        eval_gm: fx.GraphModule,
        cut_points: list[CutPoint],
        segments: list[Segment],
        total_flops: int,
        output_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.example_input = example_input
        self.train_graph = train_gm
        self.eval_graph = eval_gm
        self.cut_points = cut_points
        self.segments = segments
        self.total_flops = total_flops  # forward FLOPs per sample of the whole model
        self.output_shape = output_shape  # per sample, e.g. (classes,); None: not one tensor
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def __repr__(self) -> str:
        return (
            f"DropGraph({type(self.model).__name__}, {len(self.cut_points)} cut points, "
            f"{len(self.segments)} segments)"
        )

    def cut_point(self, cut: CutPoint | int | str) -> CutPoint:
        """Resolve a cut point given as a CutPoint, an index, a node name or a module path."""
        if isinstance(cut, CutPoint):
            if cut.index >= len(self.cut_points) or self.cut_points[cut.index] != cut:
                raise CutPointError(f"cut point '{cut.name}' belongs to another DropGraph; use dg.cut_points")
            return cut
        if isinstance(cut, int) and not isinstance(cut, bool):
            if -len(self.cut_points) <= cut < len(self.cut_points):
                return self.cut_points[cut]
            raise CutPointError(
                "cut index {cut} is out of range: this model has {n} cut points (0..{last}); list them "
                "with {inspect}",
                cut=cut,
                n=len(self.cut_points),
                last=len(self.cut_points) - 1,
                inspect=_INSPECT,
            )
        if isinstance(cut, str):
            by_name = [cp for cp in self.cut_points if cut == cp.name]
            # a module can hold several cut points; the last one is where it is finished
            by_module = [cp for cp in self.cut_points if cut == cp.module]
            if by_name or by_module:
                return (by_name or by_module)[-1]
            if cut.isdigit():
                return self.cut_point(int(cut))
            near = [cp.module or cp.name for cp in self.cut_points if cut in cp.module or cut in cp.name][:5]
            hint = f" (close: {', '.join(near)})" if near else ""
            raise CutPointError(
                "no cut point named '{cut}'{hint}; use a node name, module path or index from {inspect}",
                cut=cut,
                hint=hint,
                inspect=_INSPECT,
            )
        raise CutPointError(f"a cut is a CutPoint, an int or a str, not {type(cut).__name__}")

    def segment_of(self) -> dict[str, int]:
        """Segment index of every parameter name."""
        return {name: s.index for s in self.segments for name in s.param_names}

    def split(self, cut: CutPoint | int | str) -> tuple[GraphPiece, GraphPiece]:
        """Split the model at `cut` into a frozen prefix and a trainable suffix.

        Both share the model's parameters and buffers. The prefix's parameters get
        `requires_grad=False` (on the model too: that is the freezing) and it always runs in eval
        mode; the suffix's parameters get back the `requires_grad` they had when the model was
        traced. The latest split decides: a split before an earlier one trains again what that one
        froze, and warns that it does; :meth:`unsplit` thaws everything.

        Returns:
            `(prefix, suffix)`, with `suffix(prefix(x))` computing `model(x)`.

        Example:
            >>> dg = fxdrop.trace(model, torch.randn(2, 3, 64, 64))
            >>> prefix, suffix = dg.split("layer2")
        """
        cp = self.cut_point(cut)
        prefix = GraphPiece(build_range(self.eval_graph, None, cp.eval_pos))
        suffix = GraphPiece(
            build_range(self.eval_graph, cp.eval_pos, None),
            build_range(self.train_graph, cp.train_pos, None),
        )
        params = dict(self.model.named_parameters())
        thawed = [
            name
            for seg in self.segments
            if seg.index > cp.index
            for name in seg.param_names
            if self._requires_grad[name] and not params[name].requires_grad
        ]
        if thawed:
            warnings.warn(
                f"split at '{cp.module or cp.name}' trains again {len(thawed)} parameter tensors an "
                f"earlier split froze (e.g. {thawed[0]}); the latest split decides",
                stacklevel=2,
            )
        for seg in self.segments:
            for name in seg.param_names:
                params[name].requires_grad_(self._requires_grad[name] if seg.index > cp.index else False)
        return prefix, suffix

    def unsplit(self) -> None:
        """Give every parameter back the `requires_grad` it had when the model was traced: what
        :meth:`split` froze trains again (the pieces already made keep working).

        Example:
            >>> prefix, suffix = dg.split("layer2")  # look at the pieces
            >>> dg.unsplit()  # then train the whole model, e.g. with fxdrop.fit
        """
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad[name])

    def between(self, start: CutPoint | int | str, end: CutPoint | int | str) -> GraphPiece:
        """A frozen piece mapping the activation at cut `start` to the activation at cut `end`."""
        a, b = self.cut_point(start), self.cut_point(end)
        if b.index <= a.index:
            raise CutPointError(f"cut '{b.name}' is not after cut '{a.name}'")
        return GraphPiece(build_range(self.eval_graph, a.eval_pos, b.eval_pos))

    def prefix_modules(self, cut: CutPoint | int | str) -> list[str]:
        """Paths of the modules that run only before `cut` (in the train graph, which has every
        module a training step calls). Setting these to eval reproduces the frozen prefix inside
        the original model, as freeze-only training does."""
        pos = self.cut_point(cut).train_pos
        before: set[str] = set()
        after: set[str] = set()
        for i, n in enumerate(self.train_graph.graph.nodes):
            paths = n.meta.get(SCOPE_KEY, ()) + ((n.target,) if n.op == "call_module" else ())
            (before if i <= pos else after).update(paths)
        return sorted(before - after)


def _match_cuts(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> list[tuple[int, int]]:
    """(eval position, train position) of the cuts present in both graphs, in order."""
    train_cuts = {c.node: c.pos for c in find_raw_cuts(train_gm)}
    train_by_key = {k: n for k, n in graph_keys(train_gm).items() if n in train_cuts}
    eval_key = {n: k for k, n in graph_keys(eval_gm).items()}
    pairs = []
    for c in find_raw_cuts(eval_gm):
        node = train_by_key.get(eval_key[c.node])
        if node is not None and (not pairs or train_cuts[node] > pairs[-1][1]):
            pairs.append((c.pos, train_cuts[node]))
    return pairs


def _drop_shared_tensor_cuts(
    pairs: list[tuple[int, int]], uses: list[dict[int, list[int]]]
) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Remove cuts with a parameter or buffer used on both sides; return the segment of each tensor."""
    while True:
        eval_pos = [p for p, _ in pairs]
        train_pos = [p for _, p in pairs]
        seg: dict[int, int] = {}
        bad: set[int] = set()
        for tid in set(uses[0]) | set(uses[1]):
            segs = {bisect.bisect_left(eval_pos, i) for i in uses[0].get(tid, ())}
            segs |= {bisect.bisect_left(train_pos, i) for i in uses[1].get(tid, ())}
            if not segs:
                continue
            lo, hi = min(segs), max(segs)
            seg[tid] = lo
            bad.update(range(lo, hi))  # tied tensor; cut k separates segments k and k+1
        if not bad:
            return pairs, seg
        pairs = [p for k, p in enumerate(pairs) if k not in bad]


def trace(
    model: nn.Module, example_input: torch.Tensor, *, leaf_modules: Iterable[type | str] = ()
) -> DropGraph:
    """Trace `model` and find its cut points and segments.

    Args:
        model: any nn.Module whose forward takes one tensor (optional arguments are fixed to
            their defaults).
        example_input: a batch like the training data (batch >= 2, so BatchNorm can train),
            on the model's device; used to measure shapes and FLOPs.
        leaf_modules: module types or qualified paths not to trace into.

    Returns:
        A DropGraph. The model's modes and `requires_grad` flags are as before.

    Raises:
        UntraceableModelError: torch.fx cannot trace the model; the message names the module.
        CutPointError: the model has no cut point.

    Example:
        >>> dg = fxdrop.trace(timm.create_model("resnet18"), torch.randn(2, 3, 224, 224))
        >>> prefix, suffix = dg.split(dg.cut_points[3])
    """
    train_gm, eval_gm = trace_graphs(model, leaf_modules)
    with preserve_modes(model, training=False):
        stats = measure_nodes(eval_gm, example_input)
    # only a tensor with a batch dimension can be cached per sample
    pairs = [(pe, pt) for pe, pt in _match_cuts(train_gm, eval_gm) if stats.shapes[pe] is not None]
    pairs, tensor_seg = _drop_shared_tensor_cuts(
        pairs, [tensor_uses(eval_gm, model), tensor_uses(train_gm, model)]
    )
    if not pairs:
        raise CutPointError(
            f"{type(model).__name__} has no cut point: no place where a single tensor carries everything "
            "forward in both train and eval mode (or a tied weight spans the whole model)"
        )
    segments = _segments(model, tensor_seg, len(pairs))
    total = stats.total_flops // example_input.shape[0]
    cut_points = _cut_points(pairs, stats, eval_gm, segments, example_input.shape[0])
    return DropGraph(model, example_input, train_gm, eval_gm, cut_points, segments, total, stats.shapes[-1])


def _segments(model: nn.Module, tensor_seg: dict[int, int], n_cuts: int) -> list[Segment]:
    """The parameters of each of the `n_cuts + 1` segments, by the segment that uses them."""
    seg_params: list[list[str]] = [[] for _ in range(n_cuts + 1)]
    seg_numel = [0] * (n_cuts + 1)
    for name, p in model.named_parameters():
        s = tensor_seg.get(id(p), n_cuts)  # unused parameters go with the head, which always trains
        seg_params[s].append(name)
        seg_numel[s] += p.numel()
    return [Segment(i, tuple(ps), seg_numel[i]) for i, ps in enumerate(seg_params)]


def _cut_points(
    pairs: list[tuple[int, int]],
    stats: NodeStats,
    eval_gm: fx.GraphModule,
    segments: list[Segment],
    batch: int,
) -> list[CutPoint]:
    """A CutPoint per (eval, train) node pair: its shape, size, and the FLOPs and parameters on
    either side, per sample."""
    names = module_name_at(eval_gm)
    eval_nodes = list(eval_gm.graph.nodes)
    seg_numel = [seg.num_params for seg in segments]
    total = stats.total_flops // batch
    cut_points = []
    for k, (pe, pt) in enumerate(pairs):
        shape = stats.shapes[pe] or ()
        numel = 1
        for d in shape:
            numel *= d
        pre = stats.cum_flops[pe] // batch
        cut_points.append(
            CutPoint(
                index=k,
                name=eval_nodes[pe].name,
                module=names[pe],
                shape=shape,
                bytes_per_sample=numel * 4,
                prefix_flops=pre,
                suffix_flops=total - pre,
                prefix_params=sum(seg_numel[: k + 1]),
                suffix_params=sum(seg_numel[k + 1 :]),
                eval_pos=pe,
                train_pos=pt,
            )
        )
    return cut_points


def frozen_modules(model: nn.Module) -> list[str]:
    """The outermost modules all of whose parameters have `requires_grad=False`, by path ("" for
    the whole model), plus the paths of frozen parameters held directly by partly frozen modules;
    empty when everything trains."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if not frozen:
        return []
    found: list[str] = []

    def visit(path: str, module: nn.Module) -> None:
        names = [f"{path}.{n}" if path else n for n, _ in module.named_parameters()]
        if names and all(n in frozen for n in names):
            found.append(path)
            return
        for n, _ in module.named_parameters(recurse=False):
            if (full := f"{path}.{n}" if path else n) in frozen:
                found.append(full)
        for child, sub in module.named_children():
            visit(f"{path}.{child}" if path else child, sub)

    visit("", model)
    return found
