"""What `fxdrop inspect` shows: a model's cut points with sizes and FLOPs, and, when asked,
the step time predicted at each cut from segment timings measured on this machine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import choose_tier
from .cost import StepCosts, measure_bandwidth, segment_seconds
from .graph import DropGraph, trace
from .img_size import check_img_size, default_img_size
from .models import create_model

__all__ = ["ModelReport", "inspect_model"]


@dataclass(frozen=True)
class ModelReport:
    spec: str
    img_size: int
    total_flops: int  # forward FLOPs per sample
    total_params: int
    graph: DropGraph
    cost: StepCosts | None = None  # measured when asked for (`cost=True`)
    tier: str | None = None  # the cache tier the cost assumes
    warning: str | None = None  # the size is below the model's downsampling (img_size.py)

    def rows(self) -> list[dict]:
        rows = []
        for cp in self.graph.cut_points:
            row = cp.to_dict() | {"prefix_flops_fraction": cp.prefix_flops_fraction}
            if self.cost is not None:
                row |= {
                    "step_ms": 1e3 * self.cost.step_s(cp.index),
                    "ideal_step_ms": 1e3 * self.cost.compute_s(cp.index),
                }
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

    With `cost=True`, every segment's forward is timed on a batch of `batch_size` on `device`
    and the cache tier's bandwidth is measured, giving the predicted training step at each cut
    (see :mod:`fxdrop.cost`; the whole model's step is `cost.step_s(-1)`).

    Example:
        >>> report = inspect_model("timm:resnet18", img_size=64)
        >>> report.graph.cut_points[0].module
        'conv1'
    """
    model = create_model(spec) if isinstance(spec, str) else spec
    name = spec if isinstance(spec, str) else type(spec).__name__
    size = img_size if img_size is not None else default_img_size(model)
    checked = check_img_size(model, size, name, in_chans)
    x = torch.randn(2, in_chans, size, size)  # (B, C, H, W); batch 2 so BatchNorm can train
    dg = trace(model, x)
    costs, chosen = None, None
    if cost:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(dev)
        batch = torch.randn(batch_size, in_chans, size, size, device=dev)  # (B, C, H, W)
        forward, train = segment_seconds(dg, batch)
        chosen = tier or choose_tier(0, dev)
        bandwidth = measure_bandwidth(chosen, dev)
        costs = StepCosts(dg, forward, batch_size, lambda k: bandwidth, train_s=train)
    return ModelReport(
        name,
        size,
        dg.total_flops,
        sum(p.numel() for p in model.parameters()),
        dg,
        costs,
        chosen,
        checked.warning,
    )
