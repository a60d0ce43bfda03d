"""Every test (fast tests and the zoo sweep): one torch intra-op thread, unless OMP_NUM_THREADS says otherwise.

reason: on a 2-core machine with any other load, two OpenMP threads wait for each other at every
op's barrier, which makes the zoo sweep many times slower (docs/benchmarks.md, "Small
measurements behind code choices"); tests assert behaviour, never speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_home(tmp_path_factory) -> Iterator[None]:
    """fxdrop's memo of image files' hashes (data/file_facts.py) goes to a temporary folder, not ~/.cache."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
