"""The resolved configuration of a training run; written to `config.json` next to its outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FitConfig"]


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 10  # passes over the training data
    batch_size: int = 64  # global batch (split across ranks under torchrun)
    lr: float | None = None  # None: 0.1 * batch / 256 for SGD (linear scaling), 1e-3 for AdamW
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adamw"
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-5  # light: fine-tuning, and frozen layers need no regularisation
    warmup_epochs: float = 0.5  # linear LR warm-up before the cosine decay
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    cache: bool = True  # False: "freeze-only", the frozen prefix still runs forward every step
    cache_dir: str | None = None  # None: <out>/cache, or a temporary folder without --out
    cache_dtype: str | None = None  # fp32 | bf16 | fp16; None: bf16 on CUDA, fp32 on CPU (exact)
    cache_views: int = 2  # augmented views cached per sample, rotated by epoch (1 = the paper; 2: +0.8 pt, docs/benchmarks.md)
    cache_tier: str | None = None  # device | pinned | memory | disk; None: the fastest that fits
    keep_cache: bool = False  # keep the cache after a finished run (a rerun with the same prefix reuses it)
    cost_model: bool = True  # drop only where the measured cost model predicts a faster step
    device: str | None = None  # None: cuda if available, else cpu
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA (faster convolutions)
    compile: str | None = None  # torch.compile backend ("inductor") for the trainable module, recompiled at each drop; None: eager
    num_workers: int = 0  # DataLoader workers for image batches
    seed: int = 0  # model init is the caller's; this seeds data order, augmentation and dropout
    eval_every: int = 1  # validate every N epochs (always after the last)
    dist_timeout_s: float = 600.0  # bound on every collective under torchrun
    extra: dict[str, Any] = field(default_factory=dict)  # caller's notes (model spec, data source)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.1 * self.batch_size / 256 if self.optimizer == "sgd" else 1e-3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
