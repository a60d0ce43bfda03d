"""The README's own-loop example runs as written, and cached activations are what the prefix computes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import needs_fmnist

import fxdrop
from fxdrop.data import build_data

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = needs_fmnist


def test_readme_own_loop_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"<!-- own-loop[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README own-loop", "exec"), scope)  # noqa: S102 (the documented example)
    assert scope["train"].views == 2 and len(scope["train"]) == 512
    assert (tmp_path / "own-cache" / "train" / "manifest.json").exists()
    assert not any(p.requires_grad for p in scope["prefix"].parameters())


def test_cached_activations_equal_the_prefix_and_are_reused(tmp_path):
    from test_fit import small_cnn

    data = build_data("fashion-mnist", 16, limit=64, seed=0, augment=False)
    model = small_cnn(10).eval()
    prefix, _ = fxdrop.trace(model, torch.randn(2, 3, 16, 16)).split(4)
    cached = fxdrop.cache_activations(prefix, data.train, tmp_path / "c", batch_size=16)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    with torch.no_grad():
        direct = prefix(images)
    # reason: fp32; batches of 16 here vs one batch of 64 may sum convolutions in another order
    torch.testing.assert_close(
        torch.stack([cached[i][0] for i in range(len(cached))]), direct, rtol=1e-5, atol=1e-6
    )
    assert [cached[i][1] for i in range(len(cached))] == [data.train[i][1] for i in range(len(cached))]
    mtime = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    again = fxdrop.cache_activations(prefix, data.train, tmp_path / "c", batch_size=16)
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns == mtime and len(again) == len(cached)
    with pytest.raises(fxdrop.ConfigError, match="dtype"):
        fxdrop.cache_activations(prefix, data.train, tmp_path / "d", dtype="fp64")
