"""Input sizes: the size a model runs at, the smallest it works at, and the size a run picks.

A CNN downsamples its input by a total stride (32 for a ResNet, a VGG, an EfficientNet). Below
that size its last feature maps are one pixel computed mostly from padding; below a smaller size
still, a pooling layer has nothing to pool and the forward fails. The stride is timm's
`feature_info` where the model has one, else measured on the main path (maps after a global pool,
such as squeeze-excite's, do not count); the smallest size is measured, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .messages import Message, Param

__all__ = ["SizeCheck", "check_img_size", "default_img_size"]


def default_img_size(model: nn.Module, fallback: int = 224) -> int:
    """The input size the model was designed for (timm's pretrained_cfg), else `fallback`."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else fallback


def _runs(model: nn.Module, size: int, in_chans: int) -> bool:
    try:
        model(torch.zeros(1, in_chans, size, size))  # (1, C, H, W)
    except RuntimeError:  # "Output size is too small", "Kernel size can't be greater", ...
        return False
    return True


def _stride(model: nn.Module, size: int, in_chans: int) -> int:
    """The model's total downsampling: the feature extractor's largest reduction as timm records it
    (`feature_info`), else measured as `size` over the smallest side of a feature map on the main
    path."""
    reductions = _feature_reductions(model)
    if reductions:
        return max(reductions)
    sides: list[int] = []

    def hook(module, args, out):
        x = args[0] if args else None
        if not (isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(x, torch.Tensor)):
            return
        if x.dim() == 4 and min(x.shape[-2:]) == 1:
            return  # runs after a global pool (squeeze-excite's 1x1 convolutions, a head's norm)
        if isinstance(module, _POOLS) and min(out.shape[-2:]) == 1:
            return  # a pooling that takes a whole map is a global pool, not a downsampling
        sides.append(min(out.shape[-2:]))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, _ADAPTIVE)
    ]
    try:
        model(torch.zeros(1, in_chans, size, size))  # (1, C, H, W)
    finally:
        for h in handles:
            h.remove()
    return max(1, size // max(min(sides, default=size), 1))


# an adaptive pooling's output size is fixed, not a downsampling of its input
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d)


def _feature_reductions(model: nn.Module) -> list[int]:
    """The reductions of timm's `feature_info` (a list of dicts on a classifier, a `FeatureInfo`
    on a `features_only` model); empty for a model without one."""
    info = getattr(model, "feature_info", None)
    if callable(getattr(info, "reduction", None)):
        return [int(r) for r in info.reduction()]
    if isinstance(info, (list, tuple)):
        return [int(f["reduction"]) for f in info if isinstance(f, dict) and "reduction" in f]
    return []


@dataclass(frozen=True)
class SizeCheck:
    size: int  # the size checked, in pixels
    stride: int  # the model's total downsampling, measured at its own size
    warning: Message | None  # set when `size` is below `stride`: the last feature maps are mostly padding


def check_img_size(model: nn.Module, size: int, spec: str, in_chans: int = 3) -> SizeCheck:
    """Check that `model` runs on `size`-pixel images.

    Raises:
        ConfigError: `size` is not a positive whole number, or too small for the model; the
            message names the smallest size the model runs at.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError("img_size", f"must be a positive number of pixels, got {size!r}")
    own = max(size, default_img_size(model))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not _runs(model, size, in_chans):
                lo, hi = size, own  # `own` runs; find the smallest size that does
                if not _runs(model, hi, in_chans):
                    raise ConfigError("img_size", f"{size} is too small for {spec}, and so is {hi}")
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if _runs(model, mid, in_chans) else (mid, hi)
                raise ConfigError(
                    "img_size",
                    f"{size} is too small for {spec}: its feature maps vanish; the "
                    f"smallest size it runs at is {hi} px",
                )
            try:
                stride = _stride(model, own, in_chans)
            except RuntimeError:  # a head built for one size (a Linear after Flatten, a lazy module)
                stride = _stride(model, size, in_chans)
    finally:
        model.train(training)
    warning = None
    if size < stride:
        warning = Message(
            "{img_size} {size} is below {spec}'s downsampling ({stride}x): its last feature maps are 1 px, "
            "mostly padding; {stride} px is the smallest size that keeps them",
            img_size=Param("img_size"),
            size=size,
            spec=spec,
            stride=stride,
        )
    return SizeCheck(size, stride, warning)
