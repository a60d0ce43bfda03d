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

The records live by concept: `record` (the base and the progress callback), `training` (what a
run did: metrics.json and checkpoints), `run_config` (config.json), `command_output` (`inspect
--json`, `data export`) and `progress_events` (on screen only); every name is imported from here.

Example:
    >>> drop = fxdrop.records.Drop.from_json(json.load(open("runs/demo/metrics.json"))["events"][0])
    >>> drop.module, drop.hurt
"""

from .command_output import CutAlternative, CutRow, Exported
from .progress_events import (
    CacheProgress,
    Checkpoint,
    DataSummary,
    EpochStart,
    ImgSize,
    NoDrop,
    NoResume,
    Step,
    Weights,
)
from .record import Emit, EventFn, Record, emitter
from .run_config import Finetuned, RunConfig
from .training import (
    CacheBuild,
    CacheGone,
    CacheRebuilt,
    Declined,
    Drop,
    Epoch,
    Landing,
    LandingCancelled,
    Metrics,
    StoppedEarly,
    Stretch,
    UpdateEntry,
    ValAtChance,
)

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
