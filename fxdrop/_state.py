"""Helpers that change a model's state for a moment and put it back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["preserve_modes"]


@contextlib.contextmanager
def preserve_modes(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """Within the block the model is in `training` mode (unchanged when None); afterwards every
    submodule has the mode it had before."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
