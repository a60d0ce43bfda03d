"""One training step, the optimizer and its schedule, and evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import dispatch_clip_grad
from torch import nn

from .. import distributed as D
from .._state import preserve_modes
from ..config import FitConfig

__all__ = [
    "logits",
    "make_optimizer",
    "make_scheduler",
    "lr_left",
    "drop_from_optimizer",
    "train_step",
    "Accumulation",
    "evaluate",
    "validate",
]


_soft_target_ce = SoftTargetCrossEntropy()  # mixed targets' loss in timm's train.py


def logits(out: Any) -> torch.Tensor:
    # torchvision's inception/googlenet return (logits, aux) namedtuples in train mode
    return out[0] if isinstance(out, (tuple, list)) else out


def make_optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    lr = cfg.resolved_lr()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def lr_left(
    sched: torch.optim.lr_scheduler.LambdaLR, step: int, total_steps: int, steps_per_epoch: int
) -> float:
    """The learning rate still to come after `step`: the sum of the scheduled rates of the first
    parameter group over the remaining steps, divided by the steps per epoch (LR-epochs)."""
    factor, base = sched.lr_lambdas[0], sched.base_lrs[0]
    return base * sum(factor(k) for k in range(step, total_steps)) / steps_per_epoch


def drop_from_optimizer(opt: torch.optim.Optimizer) -> int:
    """Remove frozen parameters from the optimizer; every other parameter keeps its state."""
    removed = 0
    for group in opt.param_groups:
        keep = [p for p in group["params"] if p.requires_grad]
        for p in group["params"]:
            if not p.requires_grad:
                opt.state.pop(p, None)
                removed += 1
        group["params"] = keep
    return removed


def train_step(
    net: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    amp: bool,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    part: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Forward, loss and backward of `net` on one batch, then the optimizer step if the batch
    ends one; returns the batch's loss.

    Args:
        y: class indices, or `(B, classes)` soft targets from mixing, trained with timm's
            SoftTargetCrossEntropy as in timm's `train.py` (their smoothing is in them).
        part: `(k, n)`: this batch is the k-th (from 0) of the `n` batches one optimizer step
            accumulates (timm's `--grad-accum-steps`): the first clears the gradients, each adds
            those of its loss divided by `n`, and the last clips them (`clip_grad`, timm's
            `dispatch_clip_grad` in `clip_mode` norm, value or agc, over the optimizer's, i.e. the
            trainable, parameters) and steps. `(0, 1)`: one batch, one step.
    """
    k, n = part
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        out = logits(net(x)).float()  # (B, classes)
        if y.is_floating_point():  # soft targets from mixing hold their smoothing (engine/mixing.py)
            loss = _soft_target_ce(out, y)
        else:
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if k == 0:
        opt.zero_grad(set_to_none=True)
    (loss / n if n > 1 else loss).backward()
    if k + 1 == n:
        if clip_grad is not None:
            trainable = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            dispatch_clip_grad(trainable, clip_grad, mode=clip_mode)
        opt.step()
    return loss.detach()


@dataclass(frozen=True)
class Accumulation:
    """How a run of `batches` batches makes optimizer steps of `every` batches each (timm's
    `--grad-accum-steps`). When `batches` is not a multiple of `every`, the last step takes the
    batches left and divides its loss by their number, as timm's train.py does."""

    every: int
    batches: int

    def part(self, i: int) -> tuple[int, int]:
        """`train_step`'s `part` for batch `i` (from 0): its place in its step, the step's batches."""
        start = i - i % self.every
        return i - start, min(self.every, self.batches - start)


def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], info: D.DistInfo, amp: bool
) -> float:
    """Top-1 accuracy over `batches`, summed over ranks. The module's modes are restored."""
    return validate(model, batches, info, amp)[0]


@torch.no_grad()
def validate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], info: D.DistInfo, amp: bool
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy (no label smoothing) over `batches`, summed over
    ranks. The module's modes are restored."""
    sums = torch.zeros(3, dtype=torch.float64)  # (correct, samples, summed loss)
    with preserve_modes(model, training=False):
        for x, y in batches:
            with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
                out = logits(model(x)).float()  # (B, classes)
            sums[0] += (out.argmax(-1) == y).sum().item()
            sums[1] += len(y)
            sums[2] += F.cross_entropy(out, y, reduction="sum").item()
    D.all_reduce_sum(sums, info)
    n = max(sums[1].item(), 1)
    return sums[0].item() / n, sums[2].item() / n
