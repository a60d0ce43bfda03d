"""An exponential moving average of the weights (timm train.py's `--model-ema`), on timm's
`ModelEmaV3`, that knows the cut.

The average is kept on a copy of the whole model (original names, parameters and buffers, as
timm's), updated after every optimizer step. A dropped prefix no longer moves, so its average is
set to its frozen weights at the drop and left alone after: averaging the same weights into it
would change nothing but the time spent. Because the averaged prefix then equals the live one, the
cached activations are the averaged model's too, and validating the average after a drop needs
no new cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager

import torch
from timm.utils import ModelEmaV3
from torch import nn

from ..config import FitConfig
from ..runs import RunDir

__all__ = ["WeightsEma"]


class WeightsEma:
    """The run's average of the weights, or none (`cfg.model_ema` off: every method does nothing).

    Args:
        model: the model being trained (already on its device); copied once.
        cfg: `model_ema`, `model_ema_decay` and `model_ema_eval`.
    """

    def __init__(self, model: nn.Module, cfg: FitConfig) -> None:
        self.timm = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.evaluates = cfg.model_ema_eval  # validation and model-best use the average
        # the averaged tensors and the live ones they follow (floating point; others are copied)
        self._moving: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copied: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.follow(model, None)

    def validated_in(self, ck: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weights validation saw at checkpoint `ck`'s epoch: with `model_ema_eval` the
        average (from a checkpoint written without one, the model, where the average restarts),
        else the model."""
        if self.timm is not None and self.evaluates and ck.get("ema") is not None:
            return ck["ema"]
        return ck["model"]

    def follow(self, model: nn.Module, prefix: nn.Module | None) -> None:
        """The cut moved (a drop, a resume, an update's start): `prefix`'s tensors (shared with
        `model`; None: nothing frozen) are averaged no more, and their average becomes them."""
        if self.timm is None:
            return
        frozen = {id(t) for t in prefix.state_dict(keep_vars=True).values()} if prefix is not None else set()
        live = model.state_dict(keep_vars=True)
        self._moving, self._copied = [], []
        seen: set[int] = set()  # a tied tensor is averaged once
        with torch.no_grad():
            for name, avg in self.timm.module.state_dict(keep_vars=True).items():
                if id(avg) in seen:
                    continue
                seen.add(id(avg))
                avg, now = avg.detach(), live[name].detach()
                if id(live[name]) in frozen:
                    avg.copy_(now)
                elif avg.is_floating_point():
                    self._moving.append((avg, now))
                else:
                    self._copied.append((avg, now))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` of the run (from 1: timm's `num_updates`, whose first
        update copies the weights)."""
        if self.timm is None:
            return
        decay = self.timm.get_decay(step)
        if self._moving:
            avgs, nows = zip(*self._moving)
            torch._foreach_lerp_(list(avgs), list(nows), weight=1.0 - decay)
        for avg, now in self._copied:
            avg.copy_(now)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's entry: `{"ema": the average's state_dict}` (plain tensors), or nothing."""
        return {"ema": self.timm.module.state_dict()} if self.timm is not None else {}

    def load_state_dict(self, ck: dict[str, Any], model: nn.Module) -> None:
        """Restore from a checkpoint; one written without an average starts it from `model`."""
        if self.timm is None:
            return
        if ck.get("ema") is not None:
            self.timm.module.load_state_dict(ck["ema"])
        else:
            self.timm.set(model)

    def validated(self, model: nn.Module) -> nn.Module:
        """The module whose weights validation sees: the average's copy, or `model`."""
        return self.timm.module if self.timm is not None and self.evaluates else model

    def swapped_in(self, model: nn.Module) -> ContextManager[None]:
        """With `model_ema_eval`, `model` (and every piece of it sharing its tensors: a suffix)
        holds the averaged weights inside the block, its own after, bit for bit."""
        if self.timm is None or not self.evaluates:
            return nullcontext()
        return _swapped(model, self.timm.module.state_dict())

    def export(self, run_dir: RunDir) -> None:
        """`model-ema.safetensors` beside `model.safetensors` (whole model, original names)."""
        if self.timm is not None:
            run_dir.export(self.timm.module, "model-ema.safetensors")


@contextmanager
def _swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.load_state_dict(weights)
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(own)
