"""fxdrop: train CNNs faster by dropping the layers that have stopped learning (Learn&Drop on torch.fx)."""

from .errors import (
    CacheError,
    CutPointError,
    DataError,
    DistributedError,
    FxdropError,
    ModelSourceError,
    RunDirError,
    UntraceableModelError,
)
from .config import FitConfig
from .graph import CutPoint, DropGraph, Segment, trace
from .models import create_model
from .policies import Fixed, FreezeOut, LearnDrop, NoDrop, Policy, Schedule
from .train import FitResult, fit

__version__ = "0.1.0"

__all__ = [
    "trace",
    "fit",
    "FitResult",
    "FitConfig",
    "Policy",
    "LearnDrop",
    "FreezeOut",
    "Fixed",
    "Schedule",
    "NoDrop",
    "create_model",
    "DropGraph",
    "CutPoint",
    "Segment",
    "FxdropError",
    "UntraceableModelError",
    "CutPointError",
    "CacheError",
    "DataError",
    "ModelSourceError",
    "RunDirError",
    "DistributedError",
]
