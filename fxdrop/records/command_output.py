"""What `fxdrop inspect --json` prints (a row per set of frozen parameters) and what `fxdrop data
export` wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .record import Record, records_of

__all__ = ["CutAlternative", "CutRow", "Exported"]


# ---- what `fxdrop inspect --json` prints ----------------------------------------------------


@dataclass(frozen=True)
class CutAlternative(Record):
    """Another cut point that freezes the same parameters."""

    index: int
    name: str  # its fx node
    module: str


@dataclass(frozen=True)
class CutRow(Record):
    """One set of frozen parameters: the cut point a drop would choose (sizes and FLOPs per
    sample), the others equivalent to it, and, when the step costs were measured, the predicted
    step there from a cache and freeze-only and when a cache pays (all four absent otherwise)."""

    kind: ClassVar[str] = "cut_row"
    index: int
    name: str  # fx node name of the cut value
    module: str  # the module that produced it ('' for top level)
    shape: list[int]  # per sample
    bytes_per_sample: int  # fp32
    prefix_flops: int
    suffix_flops: int
    prefix_params: int  # frozen by dropping here
    suffix_params: int  # still trainable
    prefix_flops_fraction: float
    alternatives: list[CutAlternative] = field(
        default_factory=list, metadata=records_of(CutAlternative.from_json)
    )
    step_ms: float | None = None  # predicted training step from a cache
    freeze_only_step_ms: float | None = None
    cache_build_s: float | None = None
    pays_after_epochs: int | None = None  # None: a cache never pays (freeze-only is as fast)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.step_ms is None:  # not measured: no cost keys at all
            for key in ("step_ms", "freeze_only_step_ms", "cache_build_s", "pays_after_epochs"):
                del out[key]
        return out


@dataclass(frozen=True)
class Exported(Record):
    """A built-in data source written as an ImageFolder tree (`fxdrop data export`)."""

    kind: ClassVar[str] = "exported"
    dir: str
    train: int  # images written per split
    val: int
    per_class: dict[str, dict[str, int]]  # per split, images per class
