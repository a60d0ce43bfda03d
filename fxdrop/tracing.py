"""Trace any nn.Module into a torch.fx graph, in train mode and in eval mode.

The tracer knows the leaves the field already registered (timm's no-trace modules and functions,
torchvision.ops), fixes optional `forward` arguments to their defaults, and records for every node
the stack of module paths it was created under, so cut points can be named `layer3.5`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from ._state import preserve_modes
from .errors import UntraceableModelError

__all__ = ["FxdropTracer", "trace_graphs", "SCOPE_KEY"]

# Node meta key holding the tuple of module paths (outermost first) a node was created under.
SCOPE_KEY = "fxdrop_scope"


def _timm_leaves() -> tuple[set[type], list[Any]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is a dependency, but a user module must not need it
        return set(), []
    return set(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


def _torchvision_ops_leaves() -> set[type]:
    try:
        import torchvision.ops
    except ImportError:  # tracing a plain nn.Module must not need torchvision
        return set()
    # torchvision.ops modules (FrozenBatchNorm2d, StochasticDepth, ...) hold control flow
    # on tensor values; torchvision's own feature extractor keeps them as leaves too.
    return {
        obj
        for obj in vars(torchvision.ops).values()
        if isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and obj.__module__.startswith("torchvision.ops")
    }


class FxdropTracer(fx.Tracer):
    """torch.fx tracer with the field's leaves, user leaves and module-scope recording.

    Args:
        leaf_modules: extra leaves, as module types or qualified module paths (`"layer1.0"`).
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        timm_modules, timm_functions = _timm_leaves()
        import torchvision.ops  # noqa: F401  (autowrap below names the module)

        super().__init__(
            autowrap_modules=(math, torchvision.ops),
            autowrap_functions=tuple(timm_functions),
        )
        self._leaf_types = tuple(timm_modules | _torchvision_ops_leaves()) + tuple(
            m for m in leaf_modules if isinstance(m, type)
        )
        self._leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
        self._scope: list[str] = []
        self.failed_path: str | None = None  # innermost module whose trace raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_paths or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self._scope.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = path
            raise
        finally:
            self._scope.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[SCOPE_KEY] = tuple(self._scope)
        return node


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Optional forward arguments fixed to their defaults; the first argument stays the input."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _drop_fixed_placeholders(gm: fx.GraphModule, input_name: str) -> None:
    """Remove the placeholders of concrete arguments, so graphs take exactly one input.

    fx keeps such a placeholder only to guard its value (`_assert_is_none(arg)`, or
    `_assert(arg == default)`); those guards depend on nothing else and are removed with it.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.name == input_name:
            continue
        guards: list[fx.Node] = []
        todo = list(node.users)
        while todo:
            n = todo.pop()
            if n in guards:
                continue
            guards.append(n)
            todo.extend(n.users)
        mixed = [n for n in guards if any(a is not node and a not in guards for a in n.all_input_nodes)]
        if mixed or any(n.op == "output" for n in guards):
            raise UntraceableModelError(
                f"forward argument '{node.target}' still shapes the computation after being fixed to its "
                "default; wrap the model so forward takes only the image batch"
            )
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(guards, key=order.get, reverse=True):
            graph.erase_node(n)
        graph.erase_node(node)
    gm.recompile()


def _trace_one(model: nn.Module, leaf_modules: Iterable[type | str]) -> fx.GraphModule:
    tracer = FxdropTracer(leaf_modules)
    concrete = _concrete_args(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        where = tracer.failed_path
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if where:
            mtype = type(model.get_submodule(where)).__name__
            raise UntraceableModelError(
                f"cannot trace module '{where}' ({mtype}): {what}. Mark it as a leaf: "
                f"fxdrop.trace(model, x, leaf_modules=['{where}'])"
            ) from exc
        raise UntraceableModelError(
            f"cannot trace {type(model).__name__}.forward: {what}. Move the failing operation into a "
            "submodule and mark it as a leaf with leaf_modules=[...]"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    _drop_fixed_placeholders(gm, placeholders[0].name)
    return gm


def trace_graphs(
    model: nn.Module, leaf_modules: Iterable[type | str] = ()
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Trace `model` in train mode and in eval mode.

    The two graphs differ where behaviour depends on `self.training` (drop-path, aux heads).
    The model's mode is restored afterwards; `requires_grad` flags are never touched.

    Returns:
        `(train_graph, eval_graph)`, GraphModules sharing the model's parameters and buffers.
    """
    leaf_modules = tuple(leaf_modules)
    with preserve_modes(model, training=True):
        train_gm = _trace_one(model, leaf_modules)
    with preserve_modes(model, training=False):
        eval_gm = _trace_one(model, leaf_modules)
    return train_gm, eval_gm
