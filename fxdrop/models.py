"""Resolve a model spec (`timm:NAME`, `torchvision:NAME`, `path/to/file.py:FACTORY`) to an nn.Module."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from .errors import ModelSourceError
from .messages import Param

__all__ = ["create_model", "model_family"]

_HF_HOST = "huggingface.co"  # where timm's pretrained weights come from


def _close(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    return f"; close matches: {', '.join(near)}" if near else ""


def model_family(spec: str) -> tuple[str, str]:
    """Split a spec into (source, name). A bare name means timm."""
    if spec.startswith(("timm:", "torchvision:")):
        src, name = spec.split(":", 1)
        return src, name
    if ".py:" in spec:
        return "file", spec
    return "timm", spec


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline_unless_reachable() -> Iterator[None]:
    """Offline, the Hugging Face hub retries every request for most of a minute before its error;
    when the hub cannot be reached, look in the local cache only, so the error comes at once."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    if not before and not _reachable(_HF_HOST):
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _timm(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    import timm

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ModelSourceError(f"unknown timm model '{name}'{_close(name, timm.list_models())}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        if not pretrained:
            return timm.create_model(name, **kwargs)
        with _hub_offline_unless_reachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise ModelSourceError(
            "could not load pretrained weights for timm:{name} ({error}); offline? "
            "use {weights} (a safetensors or .pth state dict) or {no_pretrained}",
            name=name,
            error=type(exc).__name__,
            weights=Param("weights"),
            no_pretrained=Param("pretrained", False),
        ) from exc


def _torchvision(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        raise ModelSourceError(f"unknown torchvision model '{name}'{_close(name, names)}")
    if not pretrained:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return tvm.get_model(name, weights=None, **kwargs)
    try:
        model = tvm.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelSourceError(
            "could not download torchvision weights for {name} ({error}); offline? "
            "use {weights} (a local state dict) or {no_pretrained}",
            name=name,
            error=type(exc).__name__,
            weights=Param("weights"),
            no_pretrained=Param("pretrained", False),
        ) from exc
    if num_classes is not None:
        _reset_classifier(model, num_classes)
    return model


def _reset_classifier(model: nn.Module, num_classes: int) -> None:
    """Replace the last Linear layer with one for `num_classes` (torchvision models)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        raise ModelSourceError(
            f"{type(model).__name__} has no Linear classifier to resize; pass num_classes=None"
        )
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _from_file(spec: str, num_classes: int | None) -> nn.Module:
    path_str, _, factory = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise ModelSourceError(f"model file '{path}' does not exist; use path/to/file.py:FACTORY")
    module_name = f"fxdrop_user_model_{abs(hash(path.resolve()))}"
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelSourceError(f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        public = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        raise ModelSourceError(f"'{path}' has no function '{factory}'{_close(factory, public)}")
    try:
        try:
            model = fn(num_classes=num_classes) if num_classes is not None else fn()
        except TypeError:
            if num_classes is None:
                raise
            model = fn()  # a factory without a num_classes argument; its classifier is resized
            _reset_classifier(model, num_classes)
    except ModelSourceError:
        raise
    except Exception as exc:  # the user's code; any error it raises is theirs to fix
        raise ModelSourceError(f"{factory}() in '{path}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(spec: str, *, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """Build the model named by `spec`.

    Args:
        spec: `timm:NAME`, `torchvision:NAME`, `path/to/file.py:FACTORY`, or a bare timm name.
        num_classes: resize the classifier to this many classes (None keeps the default).
        pretrained: load the hub's pretrained weights (needs network access).

    Returns:
        The model, in train mode.

    Example:
        >>> model = create_model("timm:resnet18", num_classes=10)
    """
    source, name = model_family(spec)
    if source == "timm":
        return _timm(name, num_classes, pretrained)
    if source == "torchvision":
        return _torchvision(name, num_classes, pretrained)
    if pretrained:
        raise ModelSourceError(
            "{pretrained} applies to timm and torchvision models; load a file with {weights}",
            pretrained=Param("pretrained", True),
            weights=Param("weights"),
        )
    return _from_file(name, num_classes)
