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
from .graph import CutPoint, DropGraph, Segment, trace

__version__ = "0.1.0"

__all__ = [
    "trace",
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
