"""The record every other one is: a frozen dataclass written as a JSON object and read back
leniently (see the package's docstring), and the engine's side of a progress callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

__all__ = ["Record", "EventFn", "Emit", "emitter", "OMIT_NONE", "OMIT_EMPTY", "records_of", "json_of"]

R = TypeVar("R", bound="Record")

# a field's metadata: leave the key out of the JSON when the value is None / empty
OMIT_NONE = {"omit": lambda v: v is None}
OMIT_EMPTY = {"omit": lambda v: not v}


def records_of(read: Callable[[Any], Any], **more: Any) -> dict[str, Any]:
    """Metadata of a field holding records (one, or a list): how one is read from its JSON."""
    return {"read": read, **more}


def json_of(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [json_of(v) for v in value]
    if isinstance(value, tuple):
        return tuple(json_of(v) for v in value)
    if isinstance(value, dict):
        return {k: json_of(v) for k, v in value.items()}
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
            out[f.name] = json_of(value)
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
