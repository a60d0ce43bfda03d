"""Errors a user can cause. Each message names the thing at fault and the next step; the
parameters it names are references (fxdrop.messages), which the API and the CLI each write their
own way."""

from __future__ import annotations

from typing import Any

from .messages import Message, Param

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
    """Base class of every error fxdrop raises for bad input; the CLI prints it as one line.

    `message` is text, or a template whose `values` may name parameters (:class:`Param`) and
    functions (:class:`~fxdrop.messages.Entry`) of the API: `str(error)` writes them as the API
    does (`cache_dir`), `error.message.render(name)` as a front end does (--cache-dir).
    """

    def __init__(self, message: str, **values: Any) -> None:
        self.message = Message(message, **values)
        super().__init__(self.message.render())


class ConfigError(FxdropError):
    """An argument with a bad value: `field` is its name in the API, `problem` what is wrong (a
    template when `values` fill it, else plain text)."""

    def __init__(self, field: str, problem: str, **values: Any) -> None:
        self.field, self.problem = field, problem
        template = problem if values else problem.replace("{", "{{").replace("}", "}}")
        super().__init__("{field} " + template, field=Param(field), **values)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.field, self.problem), self.__dict__


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
