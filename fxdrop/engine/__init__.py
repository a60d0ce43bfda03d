"""The training engine: the Dropper every driver shares, and `fit`, its own driver."""

from .dropper import Drop, Dropper, EventFn
from .loop import FitResult, fit

__all__ = ["fit", "FitResult", "Dropper", "Drop", "EventFn"]
