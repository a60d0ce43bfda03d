"""What leaves the process, as typed records: an epoch and its stretches, a drop and its later
judgement, a declined drop, a cache build or rebuild, a landing, an update's entry, the run's
metrics and config, what `inspect` and `data export` report, and the progress events a run
reports along the way.

Each record is a frozen dataclass that writes itself as the JSON object metrics.json (and a
checkpoint) has always held (`to_json`) and reads one back (`from_json`). Reading is lenient, so
older files still read: a missing key takes the field's default, and a key the record does not
know is kept (in `extra`) and written back after the record's own, so a rewrite (an update adding
its entry) loses nothing. The run folder (`fxdrop.runs.RunDir`) is the one place that writes
metrics.json and config.json (`write_metrics`, `write_config`) and reads them back (`read_metrics`,
`read_config`); a checkpoint holds the records' JSON objects (plain data, read weights-only).

Progress events are these records too: `fit(on_event=...)` is called as `on_event(record.kind,
record)`. A record also reads as the JSON object it writes (`record["cut"]`, `record.get("hurt")`),
so code written against the dicts `FitResult` and `on_event` used to hand out still runs; fxdrop's
own code reads the fields.

Example:
    >>> drop = fxdrop.records.Drop.from_json(json.load(open("runs/demo/metrics.json"))["events"][0])
    >>> drop.module, drop.hurt
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

from .messages import Message

__all__ = [
    "Record",
    "EventFn",
    "Emit",
    "emitter",
    "Stretch",
    "Epoch",
    "Drop",
    "CacheBuild",
    "Declined",
    "CacheRebuilt",
    "CacheGone",
    "Landing",
    "LandingCancelled",
    "ValAtChance",
    "StoppedEarly",
    "UpdateEntry",
    "Metrics",
    "CutRow",
    "CutAlternative",
    "Exported",
    "RunConfig",
    "Finetuned",
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

R = TypeVar("R", bound="Record")

# a field's metadata: leave the key out of the JSON when the value is None / empty
_OMIT_NONE = {"omit": lambda v: v is None}
_OMIT_EMPTY = {"omit": lambda v: not v}


def _items(read: Callable[[Any], Any], **more: Any) -> dict[str, Any]:
    """Metadata of a field holding records (one, or a list): how one is read from its JSON."""
    return {"read": read, **more}


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_json(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Record(Mapping[str, Any]):
    """A record that leaves the process: written as a JSON object, read back from one."""

    kind: ClassVar[str] = ""  # the progress event's kind: `on_event(kind, record)`
    # keys of the JSON object read that this record does not know, written back after its own
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (the keys metrics.json has always had, in their order)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or ("omit" in f.metadata and f.metadata["omit"](value)):
                continue
            out[f.name] = _to_json(value)
        return out | self.extra

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """The record from its JSON object: missing keys take their defaults, unknown ones are kept."""
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values = {}
        for name, f in known.items():
            if name not in data:
                continue
            value, read = data[name], f.metadata.get("read")
            if read is not None and value is not None:
                value = [read(v) for v in value] if isinstance(value, list) else read(value)
            values[name] = value
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    # ---- read as the JSON object it writes (see the module docstring) --------------------------

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


EventFn = Callable[[str, Record], None]  # `on_event(kind, record)`: fit's progress callback
Emit = Callable[[Record], None]  # what the engine calls with each record it reports


def emitter(on_event: EventFn | None) -> Emit:
    """The engine's side of a progress callback: `on_event(record.kind, record)`, or nothing."""
    if on_event is None:
        return lambda record: None
    return lambda record: on_event(record.kind, record)


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
    stretches: list[Stretch] = field(default_factory=list, metadata=_items(Stretch.from_json))
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
    cache_dtype: str | None = field(default=None, metadata=_OMIT_NONE)  # None: no cache placed
    cache_dtype_why: str | None = field(default=None, metadata=_OMIT_NONE)
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
    val_acc_before: float | None = field(default=None, metadata=_OMIT_NONE)  # None: none before
    val_acc_after: float | None = field(default=None, metadata=_OMIT_NONE)
    val_noise: float | None = field(default=None, metadata=_OMIT_NONE)
    hurt: bool | None = field(default=None, metadata=_OMIT_NONE)

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
        } | _to_json(self.why)

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

_EPOCHS = _items(Epoch.from_json)
_DROPS = _items(Drop.from_json)
_DECLINED = _items(Declined.from_json)
_REBUILDS = _items(CacheRebuilt.from_json)


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
    stopped_early: StoppedEarly | None = field(default=None, metadata=_items(StoppedEarly.from_json))
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
    cache_builds: list[CacheBuild] = field(default_factory=list, metadata=_items(CacheBuild.from_json))
    cache_rebuilds: list[CacheRebuilt] = field(default_factory=list, metadata=_REBUILDS)  # failed a check
    val_at_chance: ValAtChance | None = field(default=None, metadata=_items(ValAtChance.from_json))
    frozen_at_start: list[str] = field(default_factory=list)  # modules the model came with frozen
    landings: list[_LandingRecord] = field(default_factory=list, metadata=_items(_LandingRecord.from_json))
    step_costs: dict[str, Any] | None = None  # the cost model's measurements (`StepCosts.to_dict`)
    policy: dict[str, Any] = field(default_factory=dict)  # the policy's settings and observations
    updates: list[UpdateEntry] = field(
        default_factory=list, metadata=_items(UpdateEntry.from_json, **_OMIT_EMPTY)
    )

    def with_update(self, entry: UpdateEntry) -> "Metrics":
        """These metrics with `entry` as its update: an update killed after writing its entry and
        resumed writes it again, not twice."""
        kept = [u for u in self.updates if u.update != entry.update]
        return replace(self, updates=[*kept, entry])


# ---- a run's config.json ---------------------------------------------------------------------


@dataclass(frozen=True)
class Finetuned(Record):
    """What `finetune` records of a run (config.json's "config"/"extra"): how to build its
    model and data again (an update of the run reads it)."""

    kind: ClassVar[str] = "finetuned"
    model: str | None = None  # the model spec (timm:NAME, torchvision:NAME, path.py:FACTORY)
    data: str | None = None  # the data source
    img_size: int | None = None
    limit: int | None = None
    classes: list[str] | None = None  # in label order
    skipped_images: int = 0
    weights: str | None = None  # the local state dict it started from
    pretrained: bool = False
    augment: bool = True


@dataclass(frozen=True)
class RunConfig(Record):
    """A run's config.json: what makes it this run (`identity`), its settings as asked
    (`FitConfig.to_dict()`, with the caller's notes under "extra") and as resolved (None: not
    recorded), and its policy's description."""

    kind: ClassVar[str] = "config"
    format: str | None = field(default=None, metadata=_OMIT_NONE)  # None: written before the marker
    version: int | None = field(default=None, metadata=_OMIT_NONE)
    identity: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """The `FitConfig` fields as asked, without the caller's notes."""
        return {k: v for k, v in self.config.items() if k != "extra"}

    @property
    def notes(self) -> dict[str, Any]:
        """The caller's notes (`FitConfig.extra`), as a dict."""
        return dict(self.config.get("extra") or {})

    @property
    def finetuned(self) -> Finetuned:
        """What `finetune` recorded (all None for a run `fit` made from a module of its own)."""
        return Finetuned.from_json(self.notes)

    @property
    def seed(self) -> int:
        return self.config.get("seed", 0)


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
        default_factory=list, metadata=_items(CutAlternative.from_json)
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
