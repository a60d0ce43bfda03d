"""What a run did, as metrics.json and its checkpoints hold it: each epoch and its stretches, a drop
and its later judgement, a declined drop, a cache build, rebuild or removal, a landing, validation
at chance, early stopping, an update's entry, and the run's metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from .record import OMIT_EMPTY, OMIT_NONE, Record, json_of, records_of

__all__ = [
    "Stretch",
    "Epoch",
    "CacheBuild",
    "Drop",
    "Declined",
    "CacheRebuilt",
    "CacheGone",
    "Landing",
    "LandingCancelled",
    "ValAtChance",
    "StoppedEarly",
    "UpdateEntry",
    "Metrics",
]


# ---- epochs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stretch(Record):
    """The steps of an epoch taken at one cut (the feed changes only between stretches)."""

    cut: int  # -1: the whole model
    cached: bool  # the prefix's activations came from a cache (else the prefix ran, freeze-only)
    steps: int
    step_seconds: float = 0.0  # mean training step, waiting for data included
    # per step, as a fraction of the whole model's: the forward, and the forward and backward
    forward_flops_fraction: float = 1.0
    train_flops_fraction: float = 1.0


@dataclass(frozen=True)
class Epoch(Record):
    """One epoch of a run or an update (metrics.json "epochs", the "epoch_end" event)."""

    kind: ClassVar[str] = "epoch_end"
    epoch: int  # numbered from 1
    train_loss: float | None = None  # the epoch's mean training loss
    train_seconds: float = 0.0  # training, drops within the epoch included
    step_seconds: float = 0.0  # mean training step, waiting for data included
    data_seconds: float = 0.0  # waiting for batches
    forward_flops_fraction: float = 1.0  # per step of the epoch, of the whole model's forward
    train_flops_fraction: float = 1.0  # the same for the forward and backward
    stretches: list[Stretch] = field(default_factory=list, metadata=records_of(Stretch.from_json))
    val_acc: float | None = None  # None: not validated this epoch
    val_loss: float | None = None
    seconds: float = 0.0  # the whole epoch: the drop before it and validation included
    cut: int = -1  # the cut at its end
    cut_module: str | None = None  # the module the cut follows
    lr: float | None = None  # the learning rate at its end

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Epoch":
        # runs made before these were recorded: the training FLOPs are the forward's, and a
        # stretch's training FLOPs and mean step the epoch's
        forward = data.get("forward_flops_fraction", 1.0)
        data = {"train_flops_fraction": forward} | dict(data)
        below = {"train_flops_fraction": data["train_flops_fraction"]}
        below["step_seconds"] = data.get("step_seconds", 0.0)
        stretches = [below | st for st in data.get("stretches") or []]
        return super().from_json(data | ({"stretches": stretches} if "stretches" in data else {}))


# ---- drops and caches ------------------------------------------------------------------------


@dataclass(frozen=True)
class _AtCut(Record):
    """What a drop and a cache build both record: when, where, and the cache made."""

    epoch: int  # numbered from 1
    step: int  # optimizer steps taken in the run (or the update) before it
    cut: int
    node: str | None = None  # the fx node of the cut
    module: str | None = None  # the module the cut follows
    cache_seconds: float = 0.0
    cache_bytes: int = 0
    cache_tier: str | None = None
    cache_dtype: str | None = field(default=None, metadata=OMIT_NONE)  # None: no cache placed
    cache_dtype_why: str | None = field(default=None, metadata=OMIT_NONE)
    why: dict[str, Any] = field(default_factory=dict)  # the policy's and the step costs' reasons

    @property
    def where(self) -> str:
        """The module the cut follows, else its node."""
        return self.module or self.node or "?"

    @property
    def predicted_steps(self) -> tuple[float, float] | None:
        """The step costs' predicted step (seconds) before and after, when they decided."""
        if "predicted_step_s" not in self.why:
            return None
        return self.why["predicted_step_s_before"], self.why["predicted_step_s"]


@dataclass(frozen=True)
class CacheBuild(_AtCut):
    """The activations at the current cut, cached once freeze-only there had cost as much."""

    kind: ClassVar[str] = "cached"


@dataclass(frozen=True)
class Drop(_AtCut):
    """The cut advanced (metrics.json "events"), and, after the next validation, whether it hurt."""

    kind: ClassVar[str] = "drop"
    forward_flops_fraction: float = 1.0  # a step's forward at the new cut, of the whole model's
    frozen_params: int = 0
    removed_from_optimizer: int = 0
    cached: bool = True  # else freeze-only: the frozen prefix runs every step
    # the judgement, after the first validation that follows (None: not judged yet)
    val_acc_before: float | None = field(default=None, metadata=OMIT_NONE)  # None: none before
    val_acc_after: float | None = field(default=None, metadata=OMIT_NONE)
    val_noise: float | None = field(default=None, metadata=OMIT_NONE)
    hurt: bool | None = field(default=None, metadata=OMIT_NONE)

    @property
    def judged(self) -> bool:
        """Whether a validation after it has said if it hurt."""
        return self.hurt is not None


@dataclass(frozen=True)
class Declined(Record):
    """A drop the policy allowed and the step costs refused (metrics.json "declined_drops"). Its
    JSON object holds the reasons (`why`) beside its own keys."""

    kind: ClassVar[str] = "declined"
    epoch: int  # numbered from 1
    step: int
    kept: int  # the cut kept
    allowed: int  # the segment the policy allowed dropping up to
    why: dict[str, Any] = field(default_factory=dict)

    @property
    def decision(self) -> str | None:
        """The step costs' verdict, in words."""
        return self.why.get("decision")

    @property
    def decide_seconds(self) -> float:
        return self.why.get("decide_seconds", 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "kept": self.kept,
            "allowed": self.allowed,
        } | json_of(self.why)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Declined":
        own = ("epoch", "step", "kept", "allowed")
        return cls(*(data[k] for k in own), why={k: v for k, v in data.items() if k not in own})


@dataclass(frozen=True)
class CacheRebuilt(Record):
    """A cache found failing a check, rebuilt (metrics.json "cache_rebuilds")."""

    kind: ClassVar[str] = "cache_rebuilt"
    step: int
    cut: int
    folder: str
    check: str  # manifest | version | format | fingerprint | missing | size | sha256
    file: str  # the file that failed it
    detail: str  # what was found, in words
    samples: int  # samples rebuilt


@dataclass(frozen=True)
class CacheGone(Record):
    """An update found its run's cache gone and rebuilt it from the images (on screen only)."""

    kind: ClassVar[str] = "cache_rebuilt"
    cut: int
    samples: int


@dataclass(frozen=True)
class _LandingRecord(Record):
    """Segments whose learning rate anneals to zero before they freeze (metrics.json
    "landings"); the JSON object names its kind."""

    epoch: int  # numbered from 1
    step: int
    segments: list[int]
    modules: list[str]
    ends_at_step: int | None = None  # when their rate reaches zero (None: cancelled)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind} | super().to_json()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "_LandingRecord":
        """The record of the kind `data` names."""
        kind = LandingCancelled if data.get("kind") == LandingCancelled.kind else Landing
        return super(_LandingRecord, kind).from_json({k: v for k, v in data.items() if k != "kind"})


@dataclass(frozen=True)
class Landing(_LandingRecord):
    kind: ClassVar[str] = "landing"


@dataclass(frozen=True)
class LandingCancelled(_LandingRecord):
    kind: ClassVar[str] = "landing_cancelled"


@dataclass(frozen=True)
class ValAtChance(Record):
    """Validation at chance while the training loss fell (said once a run; metrics.json)."""

    kind: ClassVar[str] = "val_at_chance"
    epoch: int
    val_acc: float
    chance: float
    train_loss_first: float
    train_loss: float
    bn_momentum: float | None
    why: str


@dataclass(frozen=True)
class StoppedEarly(Record):
    """`patience` validated epochs passed without improvement (metrics.json "stopped_early")."""

    kind: ClassVar[str] = "stopped_early"
    after_epoch: int
    best_epoch: int
    patience: int
    reason: str


# ---- a run's metrics and its updates ---------------------------------------------------------

_EPOCHS = records_of(Epoch.from_json)
_DROPS = records_of(Drop.from_json)
_DECLINED = records_of(Declined.from_json)
_REBUILDS = records_of(CacheRebuilt.from_json)


@dataclass(frozen=True)
class UpdateEntry(Record):
    """One update of a finished run (metrics.json "updates")."""

    kind: ClassVar[str] = "update"
    update: int  # numbered from 1
    data: str | None = None  # what the data was (a folder)
    replay: str = "all"  # "all": trained on every training sample; "new": on those the run never saw
    new_samples: int = 0  # samples (train + val) not in the run's data
    removed_samples: int = 0
    reused_samples: int = 0  # activations found in the cache
    reclaimed_bytes: int = 0  # given back by compacting the rows of removed samples
    prefix_samples: int = 0  # samples that went through the frozen prefix (every cached view)
    prefix_seconds: float = 0.0
    rebuilt_cache: bool = False
    cut_before: int = -1
    cut: int = -1
    epochs: list[Epoch] = field(default_factory=list, metadata=_EPOCHS)
    events: list[Drop] = field(default_factory=list, metadata=_DROPS)
    final_val_acc: float = 0.0
    total_seconds: float | None = None  # None: not recorded (an older file)
    cache_bytes: int | None = None  # None: not recorded (the run's stands)
    decide_seconds: float = 0.0
    declined_drops: list[Declined] = field(default_factory=list, metadata=_DECLINED)
    steps_per_epoch: int | None = None
    cache_rebuilds: list[CacheRebuilt] = field(default_factory=list, metadata=_REBUILDS)


@dataclass(frozen=True)
class Metrics(Record):
    """A run's metrics.json: its epochs, drops and what they cost, and its updates."""

    kind: ClassVar[str] = "metrics"
    epochs: list[Epoch] = field(default_factory=list, metadata=_EPOCHS)
    events: list[Drop] = field(default_factory=list, metadata=_DROPS)
    total_seconds: float | None = None  # None: not recorded (an older file)
    final_val_acc: float = 0.0  # the whole model, evaluated at the end
    best_epoch: int | None = None  # its weights: model-best.safetensors
    best_val_acc: float | None = None
    stopped_early: StoppedEarly | None = field(default=None, metadata=records_of(StoppedEarly.from_json))
    cache_bytes: int = 0
    world_size: int = 1
    declined_drops: list[Declined] = field(default_factory=list, metadata=_DECLINED)
    steps_per_epoch: int | None = None
    forward_flops_fraction: float = 1.0  # per training step over the run, of the whole model's
    train_flops_fraction: float = 1.0
    checkpoint_bytes: int = 0
    no_drop: str | None = None  # why nothing was dropped, when nothing was
    decide_seconds: float = 0.0
    cache_build_seconds: float = 0.0
    cache_builds: list[CacheBuild] = field(default_factory=list, metadata=records_of(CacheBuild.from_json))
    cache_rebuilds: list[CacheRebuilt] = field(default_factory=list, metadata=_REBUILDS)  # failed a check
    val_at_chance: ValAtChance | None = field(default=None, metadata=records_of(ValAtChance.from_json))
    frozen_at_start: list[str] = field(default_factory=list)  # modules the model came with frozen
    landings: list[_LandingRecord] = field(
        default_factory=list, metadata=records_of(_LandingRecord.from_json)
    )
    step_costs: dict[str, Any] | None = None  # the cost model's measurements (`StepCosts.to_dict`)
    policy: dict[str, Any] = field(default_factory=dict)  # the policy's settings and observations
    updates: list[UpdateEntry] = field(
        default_factory=list, metadata=records_of(UpdateEntry.from_json, **OMIT_EMPTY)
    )

    def with_update(self, entry: UpdateEntry) -> "Metrics":
        """These metrics with `entry` as its update: an update killed after writing its entry and
        resumed writes it again, not twice."""
        kept = [u for u in self.updates if u.update != entry.update]
        return replace(self, updates=[*kept, entry])
