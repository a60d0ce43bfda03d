"""timm train.py's EMA of the weights, gradient accumulation and TensorBoard logs in fit/finetune
(toy models on random tensors; the CLI on a 16-px Fashion-MNIST subset)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DropAfterObservations, needs_fmnist, run_cli, tiny_model
from safetensors.torch import load_file
from torch import nn

import fxdrop
from fxdrop.cost import StepCosts
from fxdrop.engine import loop
from fxdrop.engine.step import Accumulation


@pytest.fixture(scope="module")
def toy_data():
    # 160 training samples: 2.5 batches of 64, 5 of 32, so the epoch's last step is partial
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(192, 3, 8, 8, generator=g), torch.randint(0, 4, (192,), generator=g)
    return torch.utils.data.TensorDataset(x[:160], y[:160]), torch.utils.data.TensorDataset(x[160:], y[160:])


def _fit(data, out: Path | None, policy=None, **kw) -> fxdrop.FitResult:
    kw = {"epochs": 2, "batch_size": 32, "seed": 0, "cache_dtype": "fp32"} | kw
    return fxdrop.fit(tiny_model(), *data, policy=policy or fxdrop.NoDrop(), out_dir=out, **kw)


def _accuracy(state: dict[str, torch.Tensor], val) -> float:
    model = tiny_model()
    model.load_state_dict(state, strict=True)
    model.eval()
    x, y = val.tensors
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def _model_file(folder: Path) -> str:
    """`fxdrop finetune`'s spec of a one-conv model in `folder`."""
    (folder / "tiny.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    return f"{folder / 'tiny.py'}:build"


class Interrupt(Exception):
    pass


# ---- gradient accumulation -------------------------------------------------------------------


def test_the_parts_of_an_optimizer_step():
    # 5 batches, 2 a step: the epoch's last step has the one batch left, its loss divided by 1
    parts = [Accumulation(2, 5).part(i) for i in range(5)]
    assert parts == [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]
    assert [Accumulation(1, 3).part(i) for i in range(3)] == [(0, 1)] * 3


def test_batch_32_accumulated_twice_trains_as_batch_64(toy_data):
    big = _fit(toy_data, None, batch_size=64)
    accumulated = _fit(toy_data, None, batch_size=32, grad_accum_steps=2)
    small = _fit(toy_data, None, batch_size=32)
    # the same optimizer steps, learning rate (0.1 x 64 / 256 for both) and schedule
    assert [h["lr"] for h in accumulated.history] == [h["lr"] for h in big.history]
    assert [h["stretches"][0]["steps"] for h in accumulated.history] == [3, 3]
    a, b, c = accumulated.model.state_dict(), big.model.state_dict(), small.model.state_dict()
    for k in a:
        # reason: the same samples' gradients, summed as two halves of 32 then added instead of
        # one sum of 64 (float32 rounding, compounded over 6 steps); the last step (32 samples)
        # is divided by 1, as batch 64's last batch of 32
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    # without accumulation, batch 32 takes other steps: the comparison above can fail
    assert any(not torch.allclose(c[k], b[k], rtol=1e-4, atol=1e-6) for k in c)


def _toy_costs(**kw) -> StepCosts:
    """Five segments (conv, relu, conv, flatten, head) timed by hand: each conv and the head take
    3 s forward and backward on a batch of 10, 1 s forward; a whole-model batch: 9 s."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model.extend([nn.Flatten(), nn.Linear(4 * 8 * 8, 2)])
    dg = fxdrop.trace(model, torch.randn(2, 3, 8, 8))
    timed = {"forward_s": [1.0, 0.0, 1.0, 0.0, 1.0], "train_s": [3.0, 0.0, 3.0, 0.0, 3.0]}
    return StepCosts(dg, batch_size=10, bandwidth=lambda k: 1000.0, sample_bytes=lambda k: 100, **timed, **kw)


def test_step_costs_are_per_optimizer_step_of_accumulated_batches():
    one, two = _toy_costs(), _toy_costs(batches_per_step=2)
    # the same machine measured by two drivers: 10 s a batch, 1 s of it waiting for images
    one.observe(-1, step_s=10.0, wait_s=1.0)
    two.observe(-1, step_s=20.0, wait_s=2.0)  # a step of two batches
    assert (one.correction, one.image_wait_s) == (two.correction, two.image_wait_s) == (1.0, 1.0)
    assert (one.step_s(-1), two.step_s(-1)) == (10.0, 20.0)  # what each observed, predicted back
    assert (one.step_s(1, cached=False), two.step_s(1, cached=False)) == (8.0, 16.0)  # 6 + 1 + wait
    assert one.build_s(-1, 1, 1000) == two.build_s(-1, 1, 1000)  # a build counts samples, not steps


def test_a_drop_within_an_epoch_keeps_every_batch_with_accumulation(toy_data, monkeypatch):
    rows, steps = [], []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda net, x, y, *a: rows.append(len(y)) or real(net, x, y, *a))
    result = _fit(
        toy_data,
        None,
        DropAfterObservations(2, 6),
        epochs=3,
        batch_size=16,
        grad_accum_steps=2,
        on_event=lambda kind, info: steps.append(info["step"]) if kind == "step" else None,
    )
    (event,) = result.events
    assert event["epoch"] == 2 and 0 < event["step"] - 5 < 5  # the middle of epoch 2 (5 steps an epoch)
    assert steps == [1, 2, 3, 4, 5] * 3  # optimizer steps, 2 batches of 16 each
    assert len(rows) == 30 and sum(rows[10:20]) == 160  # every batch, every sample, across the drop


def test_a_cached_run_with_accumulation_and_ema_resumes_exactly(toy_data, tmp_path):
    kw = {
        "epochs": 3,
        "grad_accum_steps": 2,
        "model_ema": True,
        "model_ema_decay": 0.9,
        "model_ema_eval": True,
        "cost_model": False,  # reason: cache at the drop whatever this machine's step costs say
    }
    full = _fit(toy_data, tmp_path / "full", fxdrop.Fixed(2, 1), **kw)
    assert full.cut == 2 and full.events[0]["cached"]

    def boom(kind, info):
        if kind == "step" and info["epoch"] == 3 and info["step"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(toy_data, tmp_path / "crash", fxdrop.Fixed(2, 1), on_event=boom, **kw)
    resumed = _fit(toy_data, tmp_path / "crash", fxdrop.Fixed(2, 1), resume=True, **kw)
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in full.history]
    for name in ("model.safetensors", "model-ema.safetensors", "model-best.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "crash" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


# ---- EMA of the weights --------------------------------------------------------------------------


def test_the_prefix_average_is_its_frozen_weights_and_the_rest_averages(toy_data, tmp_path):
    seen: list[dict[str, torch.Tensor]] = []  # the weights after every optimizer step
    model = tiny_model()
    result = fxdrop.fit(
        model,
        *toy_data,
        policy=fxdrop.Fixed(2, 1),
        out_dir=tmp_path / "run",
        epochs=3,
        batch_size=32,
        model_ema=True,
        model_ema_decay=0.9,
        landing=0,
        on_event=lambda kind, info: (
            seen.append({k: v.clone() for k, v in model.state_dict().items()}) if kind == "step" else None
        ),
    )
    assert result.cut == 2 and len(seen) == 15
    ema = load_file(tmp_path / "run" / "model-ema.safetensors")
    final = result.model.state_dict()
    frozen = {n for s in result.graph.segments[: result.cut + 1] for n in s.param_names}
    assert frozen and frozen < set(final)
    for k in final:
        if k in frozen:
            assert torch.equal(ema[k], final[k]), k  # exactly the frozen weights
            continue
        # the textbook average, in float64: the first step copies the weights (timm's ModelEmaV3)
        avg = seen[0][k].double()
        for w in seen[1:]:
            avg = 0.9 * avg + 0.1 * w[k].double()
        # reason: float32 in-place lerp against this float64 recursion over 15 steps
        torch.testing.assert_close(ema[k].double(), avg, rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.equal(ema[k], final[k]), k  # it does average


@pytest.mark.parametrize("ema_eval", [False, True])
def test_validation_and_model_best_follow_model_ema_eval(toy_data, tmp_path, ema_eval):
    out = tmp_path / "run"
    result = _fit(
        toy_data,
        out,
        fxdrop.Fixed(2, 1),
        epochs=3,
        model_ema=True,
        model_ema_decay=0.8,
        model_ema_eval=ema_eval,
    )
    validated = load_file(out / ("model-ema.safetensors" if ema_eval else "model.safetensors"))
    # the last epoch validated (from the cache) the weights the flag names, read here from the images
    assert result.history[-1]["val_acc"] == _accuracy(validated, toy_data[1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert _accuracy(load_file(out / "model-best.safetensors"), toy_data[1]) == metrics["best_val_acc"]
    assert result.final_val_acc == _accuracy(load_file(out / "model.safetensors"), toy_data[1])


@pytest.mark.parametrize(
    ("field", "value"), [("grad_accum_steps", 0), ("model_ema_decay", 1.5), ("model_ema_eval", True)]
)
def test_bad_settings_are_one_config_error(field, value):
    with pytest.raises(fxdrop.ConfigError) as err:
        fxdrop.FitConfig(**{field: value})
    assert err.value.field == field


# ---- TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_events_read_back_as_the_epoch_records(toy_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _fit(toy_data, tmp_path / "run", fxdrop.Fixed(2, 1), epochs=3, log_tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    for tag, key in (("val/top1", "val_acc"), ("train/loss", "train_loss"), ("train/cut", "cut")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in result.history]
        assert got == want, tag  # reason: TensorBoard stores scalars as float32
    texts = events.Tensors("drops/text_summary")
    assert [t.step for t in texts] == [e["epoch"] for e in result.events] == [2]


def test_log_tensorboard_without_tensorboard_is_one_line(tmp_path):
    code = (
        "import sys; sys.modules['tensorboard'] = None  # as if not installed\n"
        "import fxdrop_cli.main as m; sys.argv = ['fxdrop', *sys.argv[1:]]; m.main()\n"
    )
    args = [
        "finetune",
        _model_file(tmp_path),
        "--data",
        "fashion-mnist",
        "--log-tensorboard",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "log-tensorboard" in lines[0] and "pip install tensorboard" in lines[0]


# ---- the CLI ------------------------------------------------------------------------------------


@needs_fmnist
def test_finetune_takes_timms_flags(tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "finetune", _model_file(tmp_path), "--data", "fashion-mnist", "--img-size", "16", "--limit", "64",
        "--epochs", "2", "--batch-size", "16", "--policy", "none", "--out", str(out),
        "--grad-accum-steps", "2", "--model-ema", "--model-ema-decay", "0.99", "--model-ema-eval",
        "--log-tensorboard",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["grad_accum_steps"], config["model_ema"], config["model_ema_decay"]) == (2, True, 0.99)
    assert config["model_ema_eval"] and config["log_tensorboard"]
    assert json.loads((out / "metrics.json").read_text())["steps_per_epoch"] == 2  # 64 / 16 / 2
    assert (out / "model-ema.safetensors").is_file() and any((out / "tensorboard").iterdir())


@pytest.mark.parametrize(
    ("field", "way"),
    [
        ("grad_accum_steps", "accumulate_grad_batches"),
        ("model_ema", "WeightAveraging"),
        ("log_tensorboard", "TensorBoardLogger"),
    ],
)
def test_a_trainer_is_told_its_own_way(field, way):
    pytest.importorskip("lightning")
    from fxdrop.lightning import LayerDropping

    with pytest.raises(fxdrop.ConfigError) as err:
        LayerDropping(**{field: 2 if field == "grad_accum_steps" else True})
    assert err.value.field == field and way in str(err.value)
