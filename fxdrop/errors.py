"""Errors a user can cause. Each message names the thing at fault and the next step."""

from __future__ import annotations

__all__ = [
    "FxdropError",
    "ConfigError",
    "UntraceableModelError",
    "CutPointError",
    "CacheError",
    "DataError",
    "ModelSourceError",
    "RunDirError",
    "DistributedError",
    "DivergedError",
]


class FxdropError(Exception):
    """Base class of every error fxdrop raises for bad input; the CLI prints it as one line."""


class ConfigError(FxdropError):
    """A `fit` argument with a bad value. `field` names the argument; the CLI maps it to its flag."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"`{field}` {problem}")


class UntraceableModelError(FxdropError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported op, ...)."""


class CutPointError(FxdropError):
    """A cut point that does not exist, or a model without any cut point."""


class CacheError(FxdropError):
    """An activation cache folder that is not fxdrop's, or that cannot be written."""


class DataError(FxdropError):
    """A data directory or data source that cannot be used."""


class ModelSourceError(FxdropError):
    """A model spec (`timm:NAME`, `torchvision:NAME`, `file.py:FACTORY`) that cannot be resolved."""


class RunDirError(FxdropError):
    """An output directory that holds a different run, or a checkpoint that cannot be resumed."""


class DistributedError(FxdropError):
    """A torch.distributed run that cannot start or lost a rank."""


class DivergedError(FxdropError):
    """Training produced a non-finite loss; the run stops with its last good checkpoint."""
