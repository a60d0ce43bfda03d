"""finetune: a model spec and a data source in, a trained model and its metrics out (the CLI's main job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .data import build_data
from .errors import FxdropError, ModelSourceError
from .models import create_model
from .policies import Policy
from .report import default_img_size
from ._rng import seed_all
from .config import FitConfig
from .engine import EventFn, FitResult, fit

__all__ = ["finetune", "load_weights"]


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a safetensors or torch state dict into `model`; tensors whose shape doesn't fit (a
    classifier for another number of classes) are skipped and their names returned."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file '{path}' does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    except Exception as exc:  # reason: safetensors and torch raise several types for a bad file
        raise ModelSourceError(f"cannot read weights '{path}' ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if len(missing) > len(own) // 2:
        raise ModelSourceError(
            f"weights '{path}' do not fit this model ({len(missing)} of {len(own)} tensors missing, e.g. {missing[0]})"
        )
    return skipped + list(missing)


def finetune(
    model: str,
    data: str,
    out: str | Path,
    *,
    policy: Policy | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    limit: int | None = None,
    augment: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventFn | None = None,
    **config: Any,
) -> FitResult:
    """Fine-tune `model` (`timm:NAME`, `torchvision:NAME`, `file.py:FACTORY`) on `data`.

    Args:
        model: the model spec.
        data: `fashion-mnist`, or a folder with `train/<class>/*` and `val/<class>/*`.
        out: output folder (config.json, checkpoint.pt, metrics.json, model.safetensors).
        policy: the drop policy (default LearnDrop).
        img_size: input size in pixels (default: 32 for fashion-mnist, else the model's own).
        pretrained: start from the hub's weights (needs network).
        weights: start from a local state dict (safetensors or .pth).
        limit: train on a class-balanced subset of this many images.
        **config: FitConfig fields (epochs, batch_size, lr, cache_dtype, cache_views, device, seed...).

    Example:
        >>> finetune("timm:resnet18", "fashion-mnist", "runs/demo", epochs=3, limit=2000)
    """
    cfg = FitConfig.from_kwargs(config)  # reason: bad options fail before any model is built or file written
    if policy is not None:
        policy.check(cfg.epochs)
    probe = create_model(model, pretrained=False)
    # reason: Fashion-MNIST is 28 px; upscaling it to a model's 224 px costs 50x compute for nothing
    size = img_size or (32 if data == "fashion-mnist" else default_img_size(probe))
    bundle = build_data(data, size, model=probe, limit=limit, seed=config.get("seed", 0), augment=augment)
    del probe
    if on_event is not None:
        on_event("data", {"source": bundle.source, "train": len(bundle.train), "val": len(bundle.val),
                          "classes": len(bundle.classes), "skipped": bundle.skipped})
    if len(bundle.classes) < 2:
        raise FxdropError(f"'{data}' has {len(bundle.classes)} class; classification needs at least 2")
    seed_all(config.get("seed", 0))  # reason: the same seed gives the same initial weights
    net = create_model(model, num_classes=len(bundle.classes), pretrained=pretrained)
    if weights:
        load_weights(net, weights)
    extra = {"model": model, "data": bundle.source, "img_size": size, "limit": limit, "classes": list(bundle.classes),
             "skipped_images": bundle.skipped, "weights": weights, "pretrained": pretrained, "augment": augment}
    return fit(net, bundle.train, bundle.val, policy=policy, out_dir=out, resume=resume, overwrite=overwrite,
               on_event=on_event, extra=extra, **config)
