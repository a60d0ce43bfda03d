"""Per-sample randomness: keys that depend only on (seed, view, sample index), and the global
RNGs seeded from them around transforms that read them.

The activation cache stores prefix outputs for a given *view* of each sample; a later epoch asks
for another view. For that to be reproducible, augmenting sample ``i`` under view ``v`` must give
the same tensor in every process and every DataLoader worker, whatever was drawn before. So no
dataset reads an RNG whose state it does not set.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

_M64 = 0xFFFF_FFFF_FFFF_FFFF
# swapping the global RNGs around a timm transform must not interleave between threads
# (a read-ahead thread and the main thread); processes (DataLoader workers) each have their own.
_GLOBAL_RNG_LOCK = threading.Lock()


_GOLDEN, _MIX1, _MIX2 = 0x9E37_79B9_7F4A_7C15, 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a fixed, platform-independent 64-bit mix."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def _sample_key(seed: int, view: int, index: int) -> int:
    """A 64-bit key that depends only on (seed, view, index)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (view & _M64)) ^ (index & _M64))


@contextmanager
def _seeded_global_rngs(key: int, with_numpy: bool = True) -> Iterator[None]:
    """Seed Python's, torch's CPU and (optionally) NumPy's global RNGs from `key`; restore them on exit.

    Args:
        key: 64-bit seed.
        with_numpy: also NumPy's; saving and restoring its state costs about 150 us.
    """
    with _GLOBAL_RNG_LOCK:
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        np_state = np.random.get_state() if with_numpy else None
        random.seed(key)
        # torch.manual_seed would also reseed (and queue an init of) every CUDA generator
        torch.default_generator.manual_seed(key)
        if with_numpy:
            np.random.seed(key & 0xFFFF_FFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
            if np_state is not None:
                np.random.set_state(np_state)


def _uses_numpy_rng(transform: Callable) -> bool:
    """Whether a timm transform pipeline may draw from NumPy's global RNG.

    Of timm's transforms only the auto-augment family (RandAugment, AugMix, ...) does; the rest,
    and torchvision's, draw from Python's `random` and torch.
    """
    if type(transform).__module__.startswith("timm.data.auto_augment"):
        return True
    return any(_uses_numpy_rng(t) for t in getattr(transform, "transforms", []))  # nested Compose
