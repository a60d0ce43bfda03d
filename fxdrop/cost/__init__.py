"""Step costs: what is measured on this machine (measure.py) and the model that turns it into the
cut decision (model.py)."""

from .measure import measure_bandwidth, measure_write_rate, segment_seconds
from .model import MIN_GAIN, Decision, StepCosts

__all__ = ["StepCosts", "Decision", "MIN_GAIN", "segment_seconds", "measure_bandwidth", "measure_write_rate"]
