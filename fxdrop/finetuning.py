"""finetune: a model spec and a data source in, a trained model and its metrics out (the CLI's main job)."""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.models import clean_state_dict
from torch import nn

from ._rng import seed_all
from .config import FitConfig
from .data import DataBundle, build_data, folder_image_size, is_fashion_mnist
from .engine import EventFn, FitResult
from .engine.loop import fit_checked
from .errors import FxdropError, ModelSourceError
from .img_size import check_img_size, default_img_size
from .model_files import is_file_spec, remember
from .models import create_model
from .policies import LearnDrop, Policy
from .records import Emit, Finetuned, ImgSize, Weights, emitter

__all__ = ["finetune", "load_weights", "LoadedWeights"]


@dataclass(frozen=True)
class LoadedWeights:
    """What `load_weights` took from a file and what it left."""

    path: str
    loaded: int  # tensors of the file loaded into the model
    unused: tuple[str, ...]  # tensors of the file the model has not, or of another shape
    missing: tuple[str, ...]  # tensors of the model the file has not (they keep their initial values)
    prefix: str = ""  # the wrapper prefix taken off the file's names (DDP's "module."), if any

    def describe(self) -> str:
        """One line: what was loaded and, when something was not, how much and an example."""
        line = f"weights '{self.path}': {self.loaded} tensors loaded"
        if self.prefix:
            line += f" (prefix '{self.prefix}' removed from their names)"
        if self.unused:
            line += f"; {len(self.unused)} of the file not used (e.g. {self.unused[0]})"
        if self.missing:
            line += f"; {len(self.missing)} of the model not in the file (e.g. {self.missing[0]})"
        return line


def load_weights(model: nn.Module, path: str | Path) -> LoadedWeights:
    """Load a safetensors or torch state dict into `model`.

    A `.pth` file is read weights-only: tensors and plain containers, never code or other
    objects. Names wrapped by DDP (`module.`) or `torch.compile` (`_orig_mod.`) are unwrapped, as
    timm's `clean_state_dict` does, when that fits the model better. Tensors the model has not, or
    whose shape differs (a classifier for another number of classes), are not used; the result
    names them. A file most of whose tensors do not fit (the weights of another architecture), or
    that leaves most of the model unset, is refused.

    Raises:
        ModelSourceError: the file is missing, unreadable, holds more than tensors, or does not
            fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file '{path}' does not exist")
    state = _read_state_dict(path)
    own = model.state_dict()
    state, prefix = _unwrapped(state, own)
    unused = [
        k
        for k, v in state.items()
        if k not in own or not isinstance(v, torch.Tensor) or own[k].shape != v.shape
    ]
    usable = {k: v for k, v in state.items() if k not in set(unused)}
    missing = [k for k in own if k not in usable]
    if len(unused) * 2 > len(state) or len(missing) * 2 > len(own):
        example = unused[0] if unused else missing[0]
        raise ModelSourceError(
            f"weights '{path}' do not fit this model: {len(unused)} of the file's {len(state)} tensors are not in "
            f"it (e.g. {example}) and {len(missing)} of its {len(own)} are not in the file; are they of "
            "another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    return LoadedWeights(str(path), len(usable), tuple(unused), tuple(missing), prefix)


def _read_state_dict(path: Path) -> dict[str, Any]:
    """The state dict in a safetensors file, or in a torch file read weights-only (a checkpoint
    that wraps it under "state_dict" is unwrapped)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reason: torch warns about a raw pickle before refusing it
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # an object the weights-only unpickler refuses
        raise ModelSourceError(
            f"weights '{path}' hold objects other than tensors, which fxdrop does not load (it reads "
            "weights only and runs no code from a file); save `model.state_dict()` or a safetensors file"
        ) from exc
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise ModelSourceError(f"cannot read weights '{path}' ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelSourceError(f"weights '{path}' hold no state dict (a mapping of tensor names to tensors)")
    return state


def _unwrapped(state: dict[str, Any], own: dict[str, torch.Tensor]) -> tuple[dict[str, Any], str]:
    """`state` with DDP's / torch.compile's name prefixes removed (timm's `clean_state_dict`) when
    more of its names are then the model's, and the prefix removed; a model whose own names start
    with `module.` keeps them."""
    renamed = {k: next(iter(clean_state_dict({k: None}))) if isinstance(k, str) else k for k in state}
    if sum(renamed[k] in own for k in state) <= sum(k in own for k in state):
        return state, ""
    first = next(k for k in state if renamed[k] != k)
    return {renamed[k]: v for k, v in state.items()}, first[: len(first) - len(renamed[first])]


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
        policy: the drop policy (default LearnDrop; a LearnDrop judges the front as trained,
            `trained_front`, when the run starts from `pretrained` or `weights`).
        img_size: input size in pixels (default: 32 for fashion-mnist; for a folder the model's own,
            or the images' own when smaller).
        pretrained: start from the hub's weights (needs network).
        weights: start from a local state dict (safetensors or .pth).
        limit: train on a class-balanced subset of this many images.
        **config: FitConfig fields (epochs, batch_size, lr, cache_dtype, cache_views, device, seed...).

    Example:
        >>> finetune("timm:resnet18", "fashion-mnist", "runs/demo", epochs=3, limit=2000)
    """
    cfg = FitConfig.from_kwargs(config)  # bad options fail before any model is built or file written
    policy = policy or LearnDrop()
    if isinstance(policy, LearnDrop) and (pretrained or weights):  # its front starts trained
        policy = replace(policy, trained_front=True)
    policy.check(cfg.epochs)
    emit = emitter(on_event)
    if is_file_spec(model):  # the user names this file: an update of the run may import it again
        remember(model)
    size, bundle = _read_data(model, data, img_size, limit, cfg.seed, augment, emit)
    seed_all(cfg.seed)  # the same seed gives the same initial weights
    net = create_model(model, num_classes=len(bundle.classes), pretrained=pretrained)
    if weights:
        emit(Weights(load_weights(net, weights).describe()))
    made = Finetuned(
        model, bundle.source, size, limit, list(bundle.classes), bundle.skipped, weights, pretrained, augment
    )
    cfg = replace(cfg, extra=made.to_json())  # the run's description, known once its data is read
    data_sets = {"train": bundle.train, "val": bundle.val}
    return fit_checked(net, data_sets, policy, cfg, out, resume, overwrite, on_event)


def _read_data(
    model: str, data: str, img_size: int | None, limit: int | None, seed: int, augment: bool, emit: Emit
) -> tuple[int, DataBundle]:
    """The run's image size (chosen and checked on an untrained copy of the model) and its data,
    each said as it is known."""
    probe = create_model(model, pretrained=False)
    size, why = _choose_img_size(probe, model, data, img_size)
    checked = check_img_size(probe, size, model)
    emit(ImgSize(size, why, checked.warning))
    bundle = build_data(data, size, model=probe, limit=limit, seed=seed, augment=augment)
    emit(bundle.summary())
    if len(bundle.classes) < 2:
        raise FxdropError(f"'{data}' has {len(bundle.classes)} class; classification needs at least 2")
    return size, bundle


def _choose_img_size(probe: nn.Module, spec: str, data: str, img_size: int | None) -> tuple[int, str]:
    """The input size of a run and why: the one asked for; 32 px for Fashion-MNIST (28-px images);
    for a folder, the model's own size, or the images' own when they are smaller (upscaling them
    costs compute and cache for nothing), but not below the model's downsampling."""
    if img_size is not None:
        return img_size, "asked for"
    if is_fashion_mnist(data):
        return 32, "Fashion-MNIST's 28-px images, resized to 32"
    own = default_img_size(probe)
    native = folder_image_size(data)
    if native is None or native >= own:
        return own, f"{spec}'s own input size"
    stride = check_img_size(probe, own, spec).stride
    if native < stride:
        return stride, f"the images are {native} px; {stride} px keeps {spec}'s last feature maps"
    return native, f"the images' own size ({spec}'s is {own} px)"
