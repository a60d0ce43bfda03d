"""The training engine: `fit` and its result."""

from .loop import EventFn, FitResult, fit

__all__ = ["fit", "FitResult", "EventFn"]
