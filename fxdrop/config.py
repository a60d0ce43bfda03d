"""The resolved configuration of a training run; written to `config.json` next to its outputs.

`FitConfig` checks itself when built: a bad value is one `ConfigError` naming the `fit` argument,
raised before any model is traced or any file written.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .cache.codecs import CODECS
from .cache.tiers import TIERS
from .errors import ConfigError
from .messages import Param

__all__ = ["FitConfig"]

_OPTIMIZERS = ("sgd", "adamw")
_CLIP_MODES = ("norm", "value", "agc")  # timm.utils.dispatch_clip_grad's modes
_MIXUP_MODES = ("batch", "pair", "elem")  # timm.data.Mixup's modes
_MIX_AFTER_DROP = ("activations", "stop")  # engine/mixing.py


@dataclass(frozen=True)
class FitConfig:
    """The settings of a run: `fit`, `finetune` and `update` take them as keyword arguments.

    Attributes:
        epochs: passes over the training data (10).
        batch_size: the global batch, split across ranks under torchrun (64).
        lr: the peak learning rate; None: 0.1 * batch_size * grad_accum_steps / 256 with sgd
            (linear scaling), 1e-3 with adamw (`resolved_lr()`).
        optimizer: "sgd" (momentum, nesterov) or "adamw".
        momentum: SGD momentum (0.9).
        weight_decay: weight decay (5e-5: fine-tuning, and frozen layers need none).
        warmup_epochs: linear learning-rate warm-up before the cosine decay (0.5).
        label_smoothing: cross-entropy label smoothing (0).
        clip_grad: clip the trainable parameters' gradients to this before each optimizer step
            (timm's `--clip-grad`); None: no clipping.
        clip_mode: how `clip_grad` clips: "norm" (their total 2-norm), "value" (each element) or
            "agc" (adaptive, per unit, relative to the weights' norm), timm's `--clip-mode`.
        mixup: mixup's alpha (timm's `--mixup`); 0: off. Mixing trains on soft targets
            (timm's SoftTargetCrossEntropy), `label_smoothing` mixed into them.
        cutmix: CutMix's alpha (timm's `--cutmix`); 0: off.
        cutmix_minmax: CutMix's box sides as (min, max) fractions of the image, instead of
            `cutmix`'s alpha (timm's `--cutmix-minmax`); None: off.
        mixup_prob: the probability that a batch (or a sample, `mixup_mode`) is mixed (1.0).
        mixup_switch_prob: with mixup and CutMix both on, the probability of CutMix (0.5).
        mixup_mode: what shares one draw: "batch", "pair" or "elem" (timm's `--mixup-mode`).
        mix_after_drop: once the prefix is dropped (the images gone): "activations" mixes the
            activations at the cut as the images were (a box on the feature map for CutMix),
            "stop" mixes no more (engine/mixing.py).
        landing: epochs over which a segment's learning rate anneals to zero before it freezes
            (1; 0: at once); the policy says when a landing starts.
        cache: True: cache the activations at the cut; False: freeze-only, the frozen prefix
            still runs forward every step.
        cache_dir: the cache's folder; None: `<out>/cache`, or a temporary one without an out_dir.
        cache_dtype: how activations are stored: auto | fp32 | bf16 | fp16 | int8 | fp8; auto:
            the most exact that fits the fastest tier.
        cache_views: augmented views cached per sample, rotated by epoch (2; 1 is the paper's).
        cache_tier: where the cache lives: device | pinned | memory | disk; None: the fastest
            that fits.
        cache_memory: bytes a cache may hold in memory (device or host); None: half of what is free.
        keep_cache: keep a run's cache when it ends, for `update` and reruns (a temporary cache
            always goes).
        cost_model: drop only where the measured step costs predict a faster step.
        device: "cpu", "cuda", "cuda:1"; None: cuda if available, else cpu.
        amp: bf16 autocast; None: on with CUDA, off on the CPU.
        channels_last: channels-last memory format; None: on with CUDA (faster convolutions).
        compile: torch.compile backend ("inductor") for the trainable module, recompiled at each
            drop; None: eager.
        num_workers: DataLoader worker processes for image batches (0).
        seed: seeds data order, augmentation and dropout, and the model's initialisation when
            fxdrop creates it (0).
        eval_every: validate every N epochs, and always after the last (1).
        patience: stop after N validated epochs without a better validation accuracy (the best
            epoch's weights are in `model-best.safetensors`); None: never stop early.
        grad_accum_steps: batches per optimizer step (timm's `--grad-accum-steps`): each adds its
            gradients with its loss divided by N; the schedule, warm-up, landings and `lr`'s default
            count optimizer steps and the batch they make (batch_size x N) (1).
        model_ema: keep an exponential moving average of the weights (timm's `--model-ema`, on its
            `ModelEmaV3`), updated after every optimizer step; a dropped prefix's average is its
            frozen weights; exported as `model-ema.safetensors`.
        model_ema_decay: the average's decay per optimizer step (timm's `--model-ema-decay`, 0.9998).
        model_ema_eval: validate, and choose `model-best.safetensors`, with the averaged weights
            (timm's train.py does so whenever `--model-ema` is on without `--model-ema-force-cpu`).
        log_tensorboard: write TensorBoard event files under `<out>/tensorboard` (timm's
            `--log-tensorboard`; needs the `tensorboard` package and an out_dir).
        dist_timeout_s: the bound on every collective under torchrun, in seconds (600).
        extra: the caller's notes (model spec, data source), written to config.json.
    """

    epochs: int = 10  # passes over the training data
    batch_size: int = 64  # global batch (split across ranks under torchrun)
    lr: float | None = None  # None: 0.1 * batch / 256 for SGD (linear scaling), 1e-3 for AdamW
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adamw"
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-5  # light: fine-tuning, and frozen layers need no regularisation
    warmup_epochs: float = 0.5  # linear LR warm-up before the cosine decay
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    clip_grad: float | None = None  # clip the trainable gradients to this (timm's --clip-grad); None: off
    clip_mode: str = "norm"  # norm | value | agc: how clip_grad clips (timm's dispatch_clip_grad)
    mixup: float = 0.0  # mixup alpha (timm's --mixup); 0: off
    cutmix: float = 0.0  # CutMix alpha (timm's --cutmix); 0: off
    # CutMix box sides as fractions of the image, in [min, max) (timm's --cutmix-minmax); None: by alpha
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0  # probability of mixing a batch (or sample), timm's default
    mixup_switch_prob: float = 0.5  # probability of CutMix when both are on, timm's default
    mixup_mode: str = "batch"  # batch | pair | elem: what shares one draw (timm's default: batch)
    # after a drop: "activations" mixes the cut's activations, "stop" stops mixing; the default
    # until the long runs of benchmarks/mixing_study.py choose
    mix_after_drop: str = "activations"
    # epochs over which a segment's learning rate anneals to zero before it freezes (0: at once);
    # a length, not a time: the policy says when a landing starts (docs/benchmarks.md, "Landing")
    landing: float = 1.0
    cache: bool = True  # False: "freeze-only", the frozen prefix still runs forward every step
    cache_dir: str | None = None  # None: <out>/cache, or a temporary folder without an out_dir
    # auto | fp32 | bf16 | fp16 | int8 | fp8; auto: the most exact that fits the fastest tier
    cache_dtype: str = "auto"
    cache_views: int = 2  # augmented views cached per sample, rotated by epoch (1 = the paper; docs/benchmarks.md measures 2)
    cache_tier: str | None = None  # device | pinned | memory | disk; None: the fastest that fits
    # bytes a cache may hold in memory (device or host); None: half of what is free
    cache_memory: int | None = None
    # keep a run's cache when it ends (`update` and reruns reuse it; a temporary cache always goes)
    keep_cache: bool = True
    cost_model: bool = True  # drop only where the measured step costs predict a faster step
    device: str | None = None  # None: cuda if available, else cpu
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA (faster convolutions)
    # torch.compile backend ("inductor") for the trainable module, recompiled at each drop; None: eager
    compile: str | None = None
    num_workers: int = 0  # DataLoader workers for image batches
    seed: int = 0  # seeds data order, augmentation and dropout (and the model's init when fxdrop creates it)
    eval_every: int = 1  # validate every N epochs (always after the last)
    patience: int | None = None  # stop after N validated epochs without improvement; None: never early
    grad_accum_steps: int = 1  # batches per optimizer step, the loss divided by N (timm's --grad-accum-steps)
    model_ema: bool = False  # an EMA of the weights, model-ema.safetensors (timm's --model-ema)
    model_ema_decay: float = 0.9998  # its decay per optimizer step (timm's --model-ema-decay default)
    model_ema_eval: bool = False  # validate (and pick model-best) with the EMA's weights
    log_tensorboard: bool = False  # TensorBoard event files under <out>/tensorboard (pip install tensorboard)
    dist_timeout_s: float = 600.0  # bound on every collective under torchrun
    extra: dict[str, Any] = field(default_factory=dict)  # caller's notes (model spec, data source)

    def __post_init__(self) -> None:
        _positive_int(self, "epochs", "batch_size", "cache_views", "eval_every")
        _nonnegative_int(self, "num_workers", "seed")
        if self.patience is not None:
            _positive_int(self, "patience")
        _positive_int(self, "grad_accum_steps")
        _finite(self, "model_ema_decay", low=0.0, high=1.0)
        if self.model_ema_eval and not self.model_ema:
            raise ConfigError(
                "model_ema_eval",
                "validates with the EMA of the weights; turn on {model_ema} too",
                model_ema=Param("model_ema", True),
            )
        if self.log_tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "log_tensorboard",
                "needs the tensorboard package: pip install tensorboard (or fxdrop[tensorboard])",
            )
        if self.lr is not None:
            _finite(self, "lr", low=0.0, strict=True)
        _finite(self, "momentum", low=0.0, high=1.0)
        _finite(self, "weight_decay", low=0.0)
        _finite(self, "warmup_epochs", low=0.0)
        _finite(self, "label_smoothing", low=0.0, high=1.0)
        _finite(self, "landing", low=0.0)
        if self.clip_grad is not None:
            _finite(self, "clip_grad", low=0.0, strict=True)
        _choice(self, "clip_mode", _CLIP_MODES)
        _finite(self, "mixup", low=0.0)
        _finite(self, "cutmix", low=0.0)
        _finite(self, "mixup_prob", low=0.0, high=1.0)
        _finite(self, "mixup_switch_prob", low=0.0, high=1.0)
        _choice(self, "mixup_mode", _MIXUP_MODES)
        _choice(self, "mix_after_drop", _MIX_AFTER_DROP)
        if self.cutmix_minmax is not None:
            _minmax(self, "cutmix_minmax")
        _finite(self, "dist_timeout_s", low=0.0, strict=True)
        _choice(self, "optimizer", _OPTIMIZERS)
        if self.cache_dtype is None:  # runs made before "auto" existed stored None for the same choice
            object.__setattr__(self, "cache_dtype", "auto")
        _choice(self, "cache_dtype", ("auto", *CODECS))
        if self.cache_memory is not None:
            _positive_int(self, "cache_memory")
        _choice(self, "cache_tier", TIERS, optional=True)
        if not isinstance(self.extra, dict):
            raise ConfigError("extra", f"must be a dict, got {type(self.extra).__name__}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "FitConfig":
        """A checked config from `fit`'s keyword arguments; an unknown one is a ConfigError."""
        known = {f.name for f in fields(cls)}
        for name in kwargs:
            if name not in known:
                raise ConfigError(name, f"is not an argument of fit; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        # the batch an optimizer step averages over, accumulation included (as timm scales it)
        return 0.1 * self.batch_size * self.grad_accum_steps / 256 if self.optimizer == "sgd" else 1e-3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(cfg: FitConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(name, f"must be a positive whole number, got {v!r}")


def _nonnegative_int(cfg: FitConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(name, f"must be a whole number >= 0, got {v!r}")


def _finite(cfg: FitConfig, name: str, low: float, high: float | None = None, strict: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if strict else v >= low) and (high is None or v <= high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        raise ConfigError(
            name, f"must be a finite number {bound}{f' and <= {high}' if high is not None else ''}, got {v!r}"
        )


def _minmax(cfg: FitConfig, name: str) -> None:
    """Two fractions, min < max <= 1, kept as a tuple (config.json gives back a list)."""
    v = getattr(cfg, name)
    ok = isinstance(v, (tuple, list)) and len(v) == 2
    ok = ok and all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) for f in v)
    if not (ok and 0 <= v[0] < v[1] <= 1):
        raise ConfigError(name, f"must be two fractions of the image, min < max <= 1, got {v!r}")
    object.__setattr__(cfg, name, (float(v[0]), float(v[1])))


def _choice(cfg: FitConfig, name: str, choices: tuple[str, ...], optional: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if v not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {v!r}")
