"""Mixup and CutMix on the batch the feed yields: images before a drop, the prefix's activations
after it (cached, or recomputed freeze-only: the same batch either way, mixed the same way).

timm's `train.py` mixes with `timm.data.Mixup` and trains on its soft targets with
`SoftTargetCrossEntropy`; so does fxdrop, with the same flags and defaults (`FitConfig.mixup`,
`cutmix`, `cutmix_minmax`, `mixup_prob`, `mixup_switch_prob`, `mixup_mode`, and `label_smoothing`
mixed into the targets). Once the prefix is cached the images are gone, so after a drop
(`mix_after_drop`):

    activations  the activations at the cut are mixed as timm mixes images: a sample with its
                 partner (timm's pairs: i with B-1-i) at the same lambda, the labels mixed by that
                 lambda; mixup a linear mix, CutMix a box on the (B, C, H, W) feature map at the
                 cut's resolution, lambda from the box's area (timm's `cutmix_bbox_and_lam`)
    stop         no more mixing: the targets are the smoothed labels, as timm's after
                 `--mixup-off-epoch` (its `mixup_enabled` off)
"""

from __future__ import annotations

import torch
from timm.data.mixup import Mixup, mixup_target

from .._rng import numpy_drawn_from
from ..config import FitConfig
from ..errors import ConfigError

__all__ = ["Mixing"]


class Mixing:
    """Mixes a run's training batches and makes their targets; a run without mixing passes them on.

    Every draw (lambda, mixup or CutMix, the box) is timm's own, made inside `numpy_drawn_from`:
    timm's Mixup draws from NumPy's global generator, which is seeded per batch from (seed, rank,
    epoch, batch) and put back after. timm's code is used as it is, not rewritten around a
    generator of its own (its `rand_bbox` and the three modes would have to be copied to take
    one): a batch draws the same whatever ran before it, so a cached run, its freeze-only twin and
    a run resumed after a kill mix alike.

    Activations that are not a (B, C, H, W) map (a pooled vector, tokens), or a map too small for
    `cutmix_minmax`'s boxes, have no place for a box: there CutMix falls back to mixup (a linear
    mix at a lambda drawn from Beta(mixup), else Beta(cutmix)). A 4D activation is read as
    (B, C, H, W), the shape of a CNN's feature maps (whatever their memory format); a tensor
    shaped (B, H, W, C), as some models pass between stages, would get its box across W and C. An odd batch's last sample has no
    partner (timm needs an even batch; its loader drops the last one): it trains unmixed, on its
    smoothed label.

    Args:
        cfg: the run's settings (mixing is on when `mixup` or `cutmix` > 0 or `cutmix_minmax` is
            given, as in timm's `train.py`).
        output_shape: the model's output per sample, `(classes,)`.
        rank: this process's rank (each rank draws its own, as timm's seeds by rank).

    Example:
        >>> mixing = Mixing(FitConfig(mixup=0.8, cutmix=1.0), (10,))
        >>> x, target = mixing(images, labels, epoch=0, batch=0, cut=-1)  # target: (B, 10)
    """

    def __init__(self, cfg: FitConfig, output_shape: tuple[int, ...] | None, rank: int = 0) -> None:
        self.on = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
        self.seed, self.rank, self.after_drop = cfg.seed, rank, cfg.mix_after_drop == "activations"
        self.smoothing, self.minmax = cfg.label_smoothing, cfg.cutmix_minmax
        self.classes = output_shape[0] if output_shape and len(output_shape) == 1 else 0
        if self.on and self.classes < 2:
            field = "mixup" if cfg.mixup > 0 else "cutmix"
            raise ConfigError(
                field, f"mixes labels, and the model's output {output_shape} is not one score per class"
            )
        args = dict(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            cutmix_minmax=cfg.cutmix_minmax,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.label_smoothing,
            num_classes=max(self.classes, 1),
        )
        self.boxes = Mixup(**args)  # timm's, as train.py builds it
        # where a box has no place: mixup alone, at mixup's alpha (CutMix's when mixup is off)
        linear_alpha = cfg.mixup if cfg.mixup > 0 else self.boxes.cutmix_alpha
        self.lines = Mixup(**args | dict(mixup_alpha=linear_alpha, cutmix_alpha=0.0, cutmix_minmax=None))

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int, cut: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `batch` (from 0) of `epoch` as it trains: `x` mixed in place (every feed
        yields a fresh batch) and `(B, classes)` soft targets; `x` and the class indices `y` as
        given when the run does not mix. `cut`: the run's cut (-1: nothing dropped, `x` images)."""
        if not self.on:
            return x, y
        mixup = self.boxes if self._has_boxes(x) else self.lines
        mixup.mixup_enabled = cut < 0 or self.after_drop
        n = len(x) // 2 * 2  # (B,) -> pairs (i, n-1-i)
        with numpy_drawn_from(self.seed, self.rank, epoch, batch):
            _, target = mixup(x[:n], y[:n])  # mixes the view x[:n], so x, in place
        if n < len(x):
            target = torch.cat([target, mixup_target(y[n:], self.classes, 1.0, self.smoothing)])
        return x, target

    def _has_boxes(self, x: torch.Tensor) -> bool:
        """Whether `x` is a (B, C, H, W) map on which CutMix's boxes can be drawn."""
        if x.dim() != 4:
            return False
        if self.minmax is None:
            return True
        lo, hi = self.minmax
        # timm's rand_bbox_minmax draws each side in [int(n * lo), int(n * hi))
        return all(int(n * lo) < int(n * hi) for n in x.shape[-2:])
