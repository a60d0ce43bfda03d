"""Every random stream a run uses, in one place: seeding, the data order per epoch, the dropout
stream per epoch, the mixing draws per step, and saving/restoring the global generators for a
resume."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = ["seed_all", "epoch_order", "seed_epoch", "numpy_drawn_from", "rng_state", "set_rng_state"]


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation draws from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Positions 0..n-1 in this epoch's shuffled order (the same for cached and uncached runs)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def seed_epoch(seed: int, epoch: int) -> None:
    """Dropout / drop-path draw from a stream fixed per epoch, whatever ran before it (a cache
    build, a resume), so cached, uncached and resumed runs see the same masks."""
    torch.manual_seed(seed * 100_003 + epoch + 1)


_MIXING = 0x6D6978  # tags numpy_drawn_from's stream, apart from seed_all's


@contextmanager
def numpy_drawn_from(seed: int, rank: int, epoch: int, batch: int) -> Iterator[None]:
    """NumPy's global generator seeded from (seed, rank, epoch, batch) inside, and put back as it
    was after, on every exit: code that draws from it (timm's Mixup) draws the same for a batch of
    a resumed, cached or uncached run, whatever ran before, and nothing outside sees a draw."""
    saved = np.random.get_state()
    np.random.seed([seed % 2**32, rank, epoch, batch, _MIXING])
    try:
        yield
    finally:
        np.random.set_state(saved)


def rng_state() -> dict[str, Any]:
    """The global generators' states as plain data (tensors, ints, floats, tuples), which a
    checkpoint reads back without unpickling any object."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", uint32 array, ...)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; a checkpoint of format 1 has no numpy state (it is left as it is)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["pos"], *saved["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
