"""The progress events a run reports along the way (on screen only): the image size, the data, the
weights, epochs and steps, cache progress, checkpoints, why nothing was dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..messages import Message
from .record import Record

__all__ = [
    "ImgSize",
    "DataSummary",
    "Weights",
    "NoResume",
    "EpochStart",
    "Step",
    "CacheProgress",
    "Checkpoint",
    "NoDrop",
]


# ---- progress events (on screen only) --------------------------------------------------------


@dataclass(frozen=True)
class ImgSize(Record):
    kind: ClassVar[str] = "img_size"
    img_size: int | list[int]
    why: str  # "asked for", or how it was chosen
    warning: Message | str | None = None  # a Message names `img_size` for each front end to write


@dataclass(frozen=True)
class DataSummary(Record):
    """Where the data came from and how much of it there is."""

    kind: ClassVar[str] = "data"
    source: str
    train: int
    val: int
    classes: int
    skipped: int = 0  # unreadable images


@dataclass(frozen=True)
class Weights(Record):
    kind: ClassVar[str] = "weights"
    line: str  # what was loaded, in words


@dataclass(frozen=True)
class NoResume(Record):
    kind: ClassVar[str] = "no_resume"
    reason: str


@dataclass(frozen=True)
class EpochStart(Record):
    kind: ClassVar[str] = "epoch_start"
    epoch: int  # numbered from 1
    epochs: int
    steps: int  # steps per epoch
    cut: int


@dataclass(frozen=True)
class Step(Record):
    kind: ClassVar[str] = "step"
    epoch: int
    step: int  # in the epoch, from 1
    steps: int
    loss: float


@dataclass(frozen=True)
class CacheProgress(Record):
    kind: ClassVar[str] = "cache"
    split: str
    view: int
    done: int  # samples cached so far
    total: int


@dataclass(frozen=True)
class Checkpoint(Record):
    kind: ClassVar[str] = "checkpoint"
    epoch: int  # the epoch the checkpoint keeps
    bytes: int


@dataclass(frozen=True)
class NoDrop(Record):
    kind: ClassVar[str] = "no_drop"
    reason: str
    cut: int = -1  # >= 0: an update that continued from its run's cut
