"""What `fxdrop inspect` shows: a model's cut points with sizes and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .costmodel import CostModel, measure_cost
from .graph import DropGraph, trace
from .models import create_model

__all__ = ["ModelReport", "inspect_model", "default_img_size"]


def default_img_size(model: nn.Module, fallback: int = 224) -> int:
    """The input size the model was designed for (timm's pretrained_cfg), else `fallback`."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else fallback


@dataclass(frozen=True)
class ModelReport:
    spec: str
    img_size: int
    total_flops: int  # forward FLOPs per sample
    total_params: int
    graph: DropGraph
    cost: CostModel | None = None  # measured when asked for (`--cost`)

    def rows(self) -> list[dict]:
        rows = []
        for cp in self.graph.cut_points:
            row = cp.to_dict() | {"prefix_flops_fraction": cp.prefix_flops_fraction}
            if self.cost is not None:
                row |= {"step_ms": 1e3 * self.cost.step_seconds(cp), "ideal_step_ms": 1e3 * self.cost.ideal_seconds(cp),
                        "freeze_only_step_ms": 1e3 * self.cost.step_seconds(cp, cached=False)}
            rows.append(row)
        return rows


def inspect_model(
    spec: str | nn.Module,
    img_size: int | None = None,
    in_chans: int = 3,
    *,
    cost: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    tier: str | None = None,
) -> ModelReport:
    """Trace a model (a spec such as `timm:resnet152`, or a module) and list its cut points.

    With `cost=True`, training steps are timed on `device` and the cache tier's bandwidth is
    measured, giving the predicted step time at each cut (see :mod:`fxdrop.costmodel`).

    Example:
        >>> report = inspect_model("timm:resnet18", img_size=64)
        >>> report.graph.cut_points[0].module
        'conv1'
    """
    model = create_model(spec) if isinstance(spec, str) else spec
    size = img_size or default_img_size(model)
    x = torch.randn(2, in_chans, size, size)  # (B, C, H, W); batch 2 so BatchNorm can train
    dg = trace(model, x)
    name = spec if isinstance(spec, str) else type(spec).__name__
    cm = None
    if cost:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cm = measure_cost(dg, batch_size, dev, tier or ("device" if dev.type == "cuda" else "memory"))
    return ModelReport(name, size, dg.total_flops, sum(p.numel() for p in model.parameters()), dg, cm)
