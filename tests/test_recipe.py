"""timm train.py's recipe in fit/finetune: the resolved config, the best epoch and early stopping,
summary.csv, gradient clipping, EMA of the weights (tiny models, 16-px Fashion-MNIST subsets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import fxdrop
from fxdrop.data import build_data

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists() and "FXDROP_DATA" not in __import__("os").environ,
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)",
)


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    torch.manual_seed(0)
    return nn.Sequential(
        *block(3, 8),
        nn.MaxPool2d(2),
        *block(8, 16),
        nn.MaxPool2d(2),
        *block(16, 16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


@pytest.fixture(scope="module")
def fmnist():
    return build_data("fashion-mnist", 16, limit=192, seed=0)


def _fit(bundle, policy, out, **kw):
    model = small_cnn(len(bundle.classes))
    randomize_bn(model)
    kw = {"epochs": 3, "batch_size": 32, "seed": 0} | kw
    return fxdrop.fit(model, bundle.train, bundle.val, policy=policy, out_dir=out, **kw)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_config_says_what_was_asked_and_what_was_used(fmnist, tmp_path):
    _fit(fmnist, fxdrop.Fixed(4, 1), tmp_path / "run", epochs=2, cache_dtype="auto")
    config = _json(tmp_path / "run" / "config.json")
    asked, used = config["config"], config["resolved"]
    assert asked["lr"] is None and asked["device"] is None and asked["amp"] is None
    # sgd at batch 32: the linear scaling rule, 0.1 x 32 / 256
    assert used["lr"] == pytest.approx(0.0125)
    assert used["device"] == "cpu" and used["amp"] is False and used["channels_last"] is False
    assert used["img_size"] == 16
    # the drop after epoch 1 built a cache; "auto" chose a format, recorded as the drop's was
    drop = _json(tmp_path / "run" / "metrics.json")["events"][0]
    assert used["cache_dtype"] == drop["cache_dtype"] and used["cache_dtype"] in ("fp32", "bf16")
    assert used["cache_tier"] == drop["cache_tier"]


def test_config_resolved_keeps_what_was_given(fmnist, tmp_path):
    _fit(fmnist, fxdrop.NoDrop(), tmp_path / "run", epochs=1, lr=0.05, optimizer="adamw", device="cpu")
    used = _json(tmp_path / "run" / "config.json")["resolved"]
    assert used["lr"] == 0.05 and used["device"] == "cpu" and used["cache_dtype"] is None
