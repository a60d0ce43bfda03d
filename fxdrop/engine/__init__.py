"""The training engine: `fit` and its result."""

from .fit import EventFn, FitResult, fit

__all__ = ["fit", "FitResult", "EventFn"]
