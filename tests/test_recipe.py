"""timm train.py's recipe in fit/finetune: the resolved config, the best epoch and early stopping,
summary.csv, gradient clipping, EMA of the weights (tiny models, 16-px Fashion-MNIST subsets)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from safetensors.torch import load_file
from torch import nn

import fxdrop
from fxdrop.data import build_data
from fxdrop.engine.step import train_step
from fxdrop.engine.stopping import Best, best_of, early_stop
from fxdrop.records import Epoch

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


def _snapshots(model: nn.Module) -> tuple[dict[int, dict], callable]:
    """The model's weights at the end of each epoch, taken from fit's progress events."""
    taken: dict[int, dict] = {}

    def on_event(kind, info):
        if kind == "epoch_end":
            taken[info["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return taken, on_event


def _run(bundle, policy, out, **kw):
    model = small_cnn(len(bundle.classes))
    randomize_bn(model)
    taken, on_event = _snapshots(model)
    kw = {"epochs": 3, "batch_size": 32, "seed": 0, "cache_dtype": "fp32"} | kw
    result = fxdrop.fit(model, bundle.train, bundle.val, policy=policy, out_dir=out, on_event=on_event, **kw)
    return result, taken


def _assert_weights(path: Path, expected: dict) -> None:
    got = load_file(str(path))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_model_best_holds_the_best_validated_epoch(fmnist, tmp_path):
    result, taken = _run(fmnist, fxdrop.Fixed(4, 1), tmp_path / "run", epochs=4, lr=0.3)
    metrics = _json(tmp_path / "run" / "metrics.json")
    accs = [h["val_acc"] for h in metrics["epochs"]]
    best = accs.index(max(accs)) + 1  # the first epoch at the highest accuracy
    assert metrics["best_epoch"] == result.best_epoch == best and metrics["best_val_acc"] == max(accs)
    assert metrics["stopped_early"] is None
    _assert_weights(tmp_path / "run" / "model-best.safetensors", taken[best])
    _assert_weights(tmp_path / "run" / "model.safetensors", taken[4])  # model.safetensors stays the last
    model = small_cnn(len(fmnist.classes))
    model.load_state_dict(load_file(str(tmp_path / "run" / "model-best.safetensors")), strict=True)


def test_early_stop_is_the_first_epochs_of_the_full_run(fmnist, tmp_path):
    # a learning rate too small to change the predictions: validation stops improving at once
    kw = {"epochs": 5, "lr": 1e-7}
    full, taken = _run(fmnist, fxdrop.Fixed(4, 1), tmp_path / "full", **kw)
    stopped, _ = _run(fmnist, fxdrop.Fixed(4, 1), tmp_path / "stopped", patience=1, **kw)
    accs = [h["val_acc"] for h in full.history]
    # the first epoch k whose accuracy is no better than the best before it (patience 1)
    k = next(e for e in range(2, 6) if accs[e - 1] <= max(accs[: e - 1]))
    metrics = _json(tmp_path / "stopped" / "metrics.json")
    assert metrics["stopped_early"]["after_epoch"] == k == len(stopped.history) < 5
    assert metrics["stopped_early"] == stopped.stopped_early.to_json()
    assert [h["train_loss"] for h in stopped.history] == [h["train_loss"] for h in full.history[:k]]
    _assert_weights(tmp_path / "stopped" / "model.safetensors", taken[k])
    # resumed with the same patience: it says it stopped and trains nothing more
    events = []
    again = fxdrop.fit(
        small_cnn(len(fmnist.classes)), fmnist.train, fmnist.val, policy=fxdrop.Fixed(4, 1),
        out_dir=tmp_path / "stopped", resume=True, patience=1, epochs=5, lr=1e-7, batch_size=32,
        cache_dtype="fp32", on_event=lambda kind, info: events.append(kind),
    )  # fmt: skip
    assert "stopped_early" in events and "step" not in events and len(again.history) == k
    _assert_weights(tmp_path / "stopped" / "model.safetensors", taken[k])
    # resumed without patience: it trains on, to the same weights as the run never stopped
    on = fxdrop.fit(
        small_cnn(len(fmnist.classes)), fmnist.train, fmnist.val, policy=fxdrop.Fixed(4, 1),
        out_dir=tmp_path / "stopped", resume=True, epochs=5, lr=1e-7, batch_size=32, cache_dtype="fp32",
    )  # fmt: skip
    assert on.stopped_early is None and len(on.history) == 5 and on.best_epoch == full.best_epoch
    _assert_weights(tmp_path / "stopped" / "model.safetensors", taken[5])
    _assert_weights(tmp_path / "stopped" / "model-best.safetensors", taken[full.best_epoch])


def test_best_and_stop_from_a_hand_built_history():
    h = [Epoch(1, val_acc=0.5), Epoch(2, val_acc=None), Epoch(3, val_acc=0.6), Epoch(4, val_acc=0.6),
         Epoch(5, val_acc=0.55)]  # fmt: skip
    assert best_of(h) == Best(3, 0.6, 2)  # a tie is no improvement; an epoch not validated does not count
    assert early_stop(h, 3) is None and early_stop(h, None) is None
    assert early_stop(h, 2)["after_epoch"] == 5 and early_stop(h, 2)["best_epoch"] == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_patience_is_one_config_error(bad):
    with pytest.raises(fxdrop.ConfigError) as err:
        fxdrop.FitConfig(patience=bad)
    assert err.value.field == "patience"


def test_summary_csv_is_metrics_json_as_timm_writes_it(fmnist, tmp_path):
    _run(fmnist, fxdrop.Fixed(4, 1), tmp_path / "run", epochs=3, eval_every=2)
    epochs = _json(tmp_path / "run" / "metrics.json")["epochs"]
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "lr", "cut", "step_seconds"]
    assert len(rows) == len(epochs) == 3
    for row, h in zip(rows, epochs):
        assert int(row["epoch"]) == h["epoch"] and int(row["cut"]) == h["cut"]
        assert float(row["train_loss"]) == h["train_loss"] and float(row["lr"]) == h["lr"]
        assert float(row["step_seconds"]) == h["step_seconds"]
        if h["val_acc"] is None:  # epoch 1 of eval_every=2
            assert row["eval_loss"] == row["eval_top1"] == "" and h["epoch"] == 1
        else:
            assert float(row["eval_top1"]) == pytest.approx(100 * h["val_acc"])
            assert float(row["eval_loss"]) == h["val_loss"]
    # the last epoch's eval loss (the suffix on the cached activations) is the exported model's
    # cross-entropy on the validation images, computed here by a plain loop
    model = small_cnn(len(fmnist.classes)).eval()
    model.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    loader = torch.utils.data.DataLoader(fmnist.val, batch_size=50)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in loader]
    # reason: the fp32 cache ran the prefix on batches of another size (conv sums may round apart)
    assert epochs[-1]["val_loss"] == pytest.approx(sum(losses).item() / len(fmnist.val), rel=1e-5)


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clipping_is_over_the_optimizers_parameters_only(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    head = list(net[2].parameters())  # the optimizer's: the front still has gradients, not trained
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, x, y, torch.optim.SGD(head, lr=0.5), amp=False, clip_grad=0.05, clip_mode=mode)
    got = {k: v.clone() for k, v in net.state_dict().items()}
    # a second path: torch's own clipping on the head's gradients alone
    net.load_state_dict(ref)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(head, 0.05)
    elif mode == "value":
        torch.nn.utils.clip_grad_value_(head, 0.05)
    else:  # agc: each output unit's gradient at most 0.05 x its weights' norm (timm's adaptive_clip_grad)
        for p in head:
            w = p.detach().norm(dim=tuple(range(1, p.ndim)) if p.ndim > 1 else None, keepdim=True)
            g = p.grad.norm(dim=tuple(range(1, p.ndim)) if p.ndim > 1 else None, keepdim=True)
            limit = 0.05 * w.clamp(min=1e-3)
            p.grad.mul_(torch.where(g > limit, limit / g.clamp(min=1e-6), torch.ones_like(g)))
    torch.optim.SGD(head, lr=0.5).step()
    for k, v in net.state_dict().items():
        # reason: timm sums the norms in another order than torch's clipping
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert torch.equal(got["0.weight"], ref["0.weight"])


def test_clipping_in_a_run_with_a_drop(fmnist, tmp_path):
    clipped, _ = _run(fmnist, fxdrop.Fixed(4, 1), tmp_path / "clip", epochs=2, clip_grad=1e-3, lr=0.5)
    free, _ = _run(fmnist, fxdrop.Fixed(4, 1), tmp_path / "free", epochs=2, lr=0.5)
    assert clipped.cut == free.cut == 4
    # a tiny norm bound keeps every step tiny: the head moves far less than unclipped
    init = small_cnn(len(fmnist.classes)).state_dict()
    moved = [(r.model.state_dict()["13.weight"] - init["13.weight"]).norm() for r in (clipped, free)]
    assert moved[0] < 0.1 * moved[1]


@pytest.mark.parametrize(
    ("field", "value"), [("clip_grad", 0.0), ("clip_grad", float("nan")), ("clip_mode", "l1")]
)
def test_bad_clipping_is_one_config_error(field, value):
    with pytest.raises(fxdrop.ConfigError) as err:
        fxdrop.FitConfig(**{field: value})
    assert err.value.field == field
