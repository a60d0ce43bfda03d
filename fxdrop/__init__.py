"""fxdrop: train CNNs faster by dropping the layers that have stopped learning (Learn&Drop on torch.fx)."""

from . import records
from .activations import CachedActivations, cache_activations
from .config import FitConfig
from .engine import Dropper, FitResult, fit
from .errors import (
    CacheError,
    ConfigError,
    CutPointError,
    DataError,
    DistributedError,
    DivergedError,
    FxdropError,
    ModelSourceError,
    RunDirError,
    UntraceableModelError,
)
from .finetuning import finetune
from .graph import CutPoint, DropGraph, Segment, trace
from .models import create_model
from .policies import AutoFreeze, Fixed, FreezeOut, LearnDrop, NoDrop, Policy, Schedule
from .records import Drop, Epoch, Metrics
from .report import RunReport, plot_report, run_report
from .updating import update, update_folder

__version__ = "0.1.0"

__all__ = [
    "trace",
    "fit",
    "Dropper",
    "Drop",
    "Epoch",
    "Metrics",
    "records",
    "finetune",
    "update",
    "update_folder",
    "run_report",
    "plot_report",
    "RunReport",
    "cache_activations",
    "CachedActivations",
    "FitResult",
    "FitConfig",
    "Policy",
    "LearnDrop",
    "AutoFreeze",
    "FreezeOut",
    "Fixed",
    "Schedule",
    "NoDrop",
    "create_model",
    "DropGraph",
    "CutPoint",
    "Segment",
    "FxdropError",
    "ConfigError",
    "DivergedError",
    "UntraceableModelError",
    "CutPointError",
    "CacheError",
    "DataError",
    "ModelSourceError",
    "RunDirError",
    "DistributedError",
]
