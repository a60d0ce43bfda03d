"""The training engine: the Dropper every driver shares, and `fit`, its own driver."""

from ..records import EventFn
from .dropper import Dropper
from .loop import FitResult, fit

__all__ = ["fit", "FitResult", "Dropper", "EventFn"]
