"""A run's config.json: what makes it this run, its settings as asked and resolved, its policy, and
what `finetune` records of its model and data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .record import OMIT_NONE, Record

__all__ = ["Finetuned", "RunConfig"]


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
    format: str | None = field(default=None, metadata=OMIT_NONE)  # None: written before the marker
    version: int | None = field(default=None, metadata=OMIT_NONE)
    identity: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] | None = field(default=None, metadata=OMIT_NONE)
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
