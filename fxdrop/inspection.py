"""What `fxdrop inspect` shows: a model's cut points with sizes and FLOPs, and, when asked,
the step time predicted at each cut from segment timings measured on this machine."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .cache import choose_tier
from .config import FitConfig
from .cost import StepCosts, measure_bandwidth, measure_write_rate, segment_seconds
from .errors import ConfigError
from .graph import DropGraph, trace
from .img_size import check_img_size, default_img_size
from .messages import Message
from .models import create_model
from .records import CutAlternative, CutRow

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
    warning: Message | None = None  # the size is below the model's downsampling (img_size.py)
    images: int = 10_000  # training images per epoch that "pays after" assumes
    views: int = FitConfig.cache_views  # augmented views a cache holds per image

    def groups(self) -> list[list[int]]:
        """The cut points, one list per set of frozen parameters (only parameter-free segments
        between them), the one a drop would choose first: the smallest activation, the latest on
        ties (`StepCosts.candidates`)."""
        dg, groups = self.graph, []
        for k in range(len(dg.cut_points)):
            if groups and not dg.segments[k].param_names:
                groups[-1].append(k)
            else:
                groups.append([k])
        ordered = []
        for g in groups:
            first = min(g, key=lambda k: (dg.cut_points[k].bytes_per_sample, -k))
            ordered.append([first, *(k for k in g if k != first)])
        return ordered

    def rows(self) -> list[CutRow]:
        """One row per set of frozen parameters: the cut point a drop would choose, the others
        that freeze the same parameters (`alternatives`), and with `cost` the predicted step from
        a cache and freeze-only and the epochs after which the cache has paid for its build."""
        rows = []
        for first, *others in self.groups():
            cp, cps = self.graph.cut_points[first], self.graph.cut_points
            alternatives = [CutAlternative(k, cps[k].name, cps[k].module) for k in others]
            row = CutRow.from_json(cp.to_dict() | {"prefix_flops_fraction": cp.prefix_flops_fraction})
            row = replace(row, alternatives=alternatives, **(self._cost_row(first) if self.cost else {}))
            rows.append(row)
        return rows

    def _cost_row(self, k: int) -> dict[str, Any]:
        c = self.cost
        cached, frozen = c.step_s(k), c.step_s(k, cached=False)
        build = c.build_s(-1, k, self.images * self.views)
        saved_per_epoch = (frozen - cached) * math.ceil(self.images / c.batch_size)
        pays = math.ceil(build / saved_per_epoch) if saved_per_epoch > 0 else None
        return {
            "step_ms": 1e3 * cached,
            "freeze_only_step_ms": 1e3 * frozen,
            "cache_build_s": build,
            "pays_after_epochs": pays,  # None: a cache never pays (freeze-only is as fast)
        }

    def to_dict(self) -> dict[str, Any]:
        """What `fxdrop inspect --json` prints."""
        c = self.cost
        return {
            "model": self.spec,
            "img_size": self.img_size,
            "flops_per_sample": self.total_flops,
            "params": self.total_params,
            "batch_size": c.batch_size if c else None,
            "step_ms": 1e3 * c.step_s(-1) if c else None,  # the whole model's training step
            "tier": self.tier,
            "bandwidth_bytes_per_s": c.bandwidth(0) if c else None,
            "write_bytes_per_s": c.write_bytes_per_s if c else None,
            "images": self.images if c else None,
            "cache_views": self.views if c else None,
            "rows": [row.to_json() for row in self.rows()],
        }


def inspect_model(
    spec: str | nn.Module,
    img_size: int | None = None,
    in_chans: int = 3,
    *,
    cost: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    tier: str | None = None,
    images: int = 10_000,
) -> ModelReport:
    """Trace a model (a spec such as `timm:resnet152`, or a module) and list its cut points.

    With `cost=True`, every segment's forward and backward is timed on a batch of `batch_size`
    on `device`, and the cache tier's read bandwidth and this machine's write rate are measured,
    giving the predicted training step at each cut, from a cache and freeze-only, and the epochs
    of `images` training images after which a cache has paid for its build (the cost model of
    :mod:`fxdrop.cost`; the whole model's step is `cost.step_s(-1)`).

    Example:
        >>> report = inspect_model("timm:resnet18", img_size=64)
        >>> report.graph.cut_points[0].module
        'conv1'
    """
    model = create_model(spec) if isinstance(spec, str) else spec
    name = spec if isinstance(spec, str) else type(spec).__name__
    size = img_size if img_size is not None else default_img_size(model)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError("images", f"must be a positive number of training images, got {images!r}")
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
        costs = StepCosts(
            dg,
            forward,
            batch_size,
            lambda k: bandwidth,
            train_s=train,
            write_bytes_per_s=measure_write_rate(),
        )
    return ModelReport(
        name,
        size,
        dg.total_flops,
        sum(p.numel() for p in model.parameters()),
        dg,
        costs,
        chosen,
        checked.warning,
        images,
    )
