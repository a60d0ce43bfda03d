"""fxdrop: train CNNs faster by dropping the layers that have stopped learning (Learn&Drop on torch.fx)."""

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
from .config import FitConfig
from .graph import CutPoint, DropGraph, Segment, trace
from .models import create_model
from .activations import CachedActivations, cache_activations
from .engine import FitResult, fit
from .finetuning import finetune
from .updating import update, update_folder
from .report import RunReport, plot_report, run_report
from .policies import AutoFreeze, Fixed, FreezeOut, LearnDrop, NoDrop, Policy, Schedule

__version__ = "0.1.0"

__all__ = [
    "trace",
    "fit",
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
