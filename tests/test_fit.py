"""Training engine on real images (Fashion-MNIST subsets): exact cache, drops, resume, export."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import DropAfterObservations, needs_fmnist, randomize_bn
from safetensors.torch import load_file
from torch import nn

import fxdrop
from fxdrop.cache import ActivationCache
from fxdrop.cost import Decision, StepCosts
from fxdrop.data import build_data
from fxdrop.engine import loop
from fxdrop.policies import Policy

pytestmark = needs_fmnist


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A VGG-like toy: every layer is a cut point; BatchNorm and dropout exercise train/eval."""

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
        nn.Dropout(0.2),
        nn.Linear(16, num_classes),
    )


@pytest.fixture(scope="module")
def fmnist():
    return build_data("fashion-mnist", 16, limit=384, seed=0)


@pytest.fixture(scope="module")
def fmnist_plain():
    """No augmentation: the cache can be compared with the prefix run on the images."""
    return build_data("fashion-mnist", 16, limit=256, seed=0, augment=False)


def _fit(bundle, policy, tmp, name, **kw):
    model = small_cnn(len(bundle.classes))
    randomize_bn(model)
    kw = {"epochs": 3, "batch_size": 32, "lr": 0.05, "seed": 0} | kw
    return fxdrop.fit(model, bundle.train, bundle.val, policy=policy, out_dir=tmp / name, **kw)


def test_cached_training_equals_uncached_training(fmnist, tmp_path):
    cached = _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "cached", cache_dtype="fp32")
    frozen = _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "frozen", cache=False)
    assert cached.cut == frozen.cut == 4 and cached.cache_bytes > 0 and frozen.cache_bytes == 0
    a, b = cached.model.state_dict(), frozen.model.state_dict()
    for k in a:
        # reason: the cache computes the prefix on batches of another size and order than the
        # uncached run; conv kernels may sum in another order, so fp32 rounding differs (~1e-7
        # relative per step), amplified over 36 SGD steps (on this CPU it is bit-exact)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [h["val_acc"] for h in cached.history] == pytest.approx(
        [h["val_acc"] for h in frozen.history], abs=0.01
    )


def test_default_path_learn_drop_and_cost_decision_through_fit(fmnist, tmp_path, monkeypatch):
    # reason: the engine's path is under test, not the scores (tests/test_policies.py): wide-open
    # thresholds (the front's too) let LearnDrop allow a drop as soon as its warm-up is over, and
    # two observations per epoch end that warm-up within the run
    # reason: nor the clock: on a loaded machine the measured segments may say no drop pays; with
    # every segment 1 ms forward and 3 ms forward and backward, a frozen prefix always saves
    def segment_seconds(dg, x, *args, **kwargs):
        return [1e-3] * len(dg.segments), [3e-3] * len(dg.segments)

    monkeypatch.setattr("fxdrop.engine.cut_choice.segment_seconds", segment_seconds)
    policy = fxdrop.LearnDrop(
        left=math.inf, left_front=None, aimless=math.inf, learned=0.0, window=1, interval=0.5, wait=0.0
    )
    res = _fit(fmnist, policy, tmp_path, "ld", epochs=3)
    metrics = json.loads((tmp_path / "ld" / "metrics.json").read_text())
    observed = metrics["policy"]["observations"]
    judged = {s: v for s, v in observed["speed"].items() if int(s) not in observed["weightless"]}
    assert judged and all(len(v) >= 2 for v in judged.values())  # observed from the start, every epoch
    weightless = observed["weightless"]  # e.g. the stem's BatchNorm
    assert weightless and all(not observed["speed"][str(s)] for s in weightless)
    decided = [e["why"] for e in res.events] + metrics["declined_drops"]
    assert decided and all("predicted_step_s" in w and "decide_seconds" in w for w in decided)
    assert len(metrics["step_costs"]["segment_forward_s"]) == len(res.graph.segments)
    assert {"decide_seconds", "cache_build_seconds"} <= metrics.keys()
    assert res.events  # a frozen prefix saves (above): the cost decision below has events to check
    for e in res.events:  # the cost decision never took a slower step
        assert e["why"]["predicted_step_s"] < e["why"]["predicted_step_s_before"]
    assert res.final_val_acc > 0.2  # learned (10 classes: chance is 0.1)


def test_same_seed_same_run(fmnist, tmp_path):
    a = _fit(fmnist, fxdrop.NoDrop(), tmp_path, "a", epochs=1)
    b = _fit(fmnist, fxdrop.NoDrop(), tmp_path, "b", epochs=1)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


class TwoDrops(Policy):
    """Drops to cut `a` before epoch 0 and to cut `b` before epoch 1."""

    lands = False  # reason: drops the moment it says (a landing would move the drop later)

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def target(self, state, epoch, epochs, dropped):
        return (self.a if epoch == 0 else self.b), {}

    def describe(self):
        return {"name": "TwoDrops", "a": self.a, "b": self.b}


def test_later_drop_from_cache_equals_prefix_on_images(fmnist_plain, tmp_path):
    res = _fit(
        fmnist_plain,
        TwoDrops(2, 7),
        tmp_path,
        "two",
        epochs=2,
        cache_dtype="fp32",
        cost_model=False,
        keep_cache=True,
    )
    # reason: dropping segment 2 (the first ReLU) lets the cut pass the parameter-free MaxPool,
    # whose output is 4x smaller: the engine caches there
    assert [e["cut"] for e in res.events] == [3, 7]
    # the first cache was replaced
    assert not list((tmp_path / "two" / "cache").glob("cut-003-*"))
    (folder,) = (tmp_path / "two" / "cache").glob("cut-007-*/val-rank0of1")
    manifest = json.loads((folder / "manifest.json").read_text())
    cache = ActivationCache.open(folder, manifest["fingerprint"]).load()
    prefix, _ = res.graph.split(7)
    images = torch.stack([fmnist_plain.val[i][0] for i in range(len(fmnist_plain.val))])
    with torch.no_grad():
        direct = prefix(images)
    # reason: fp32 cache; c->c' runs the segments (2, 7] on cached activations, the same
    # operations as the prefix on the images, batched differently
    torch.testing.assert_close(cache.x[0], direct, rtol=1e-5, atol=1e-6)


def test_a_drop_within_an_epoch_continues_the_epoch_and_trains_what_freeze_only_trains(
    fmnist, tmp_path, monkeypatch
):
    rows = []
    real_step = loop.train_step
    monkeypatch.setattr(
        loop, "train_step", lambda net, x, y, *a: rows.append(len(y)) or real_step(net, x, y, *a)
    )
    seen = []
    cached = _fit(
        fmnist,
        DropAfterObservations(4, 6),
        tmp_path,
        "cached",
        epochs=3,
        cache_dtype="fp32",
        on_event=lambda kind, info: seen.append(info["step"]) if kind == "step" else None,
    )
    frozen = _fit(fmnist, DropAfterObservations(4, 6), tmp_path, "frozen", epochs=3, cache=False)
    steps = len(seen) // 3
    assert seen == list(range(1, steps + 1)) * 3  # every epoch still has all its steps, in order
    assert sum(rows[steps : 2 * steps]) == len(fmnist.train)  # and every sample, across the drop
    (event,) = cached.events
    assert event["epoch"] == 2 and 0 < event["step"] - steps < steps  # in the middle of epoch 2
    assert [h["cut"] for h in cached.history] == [-1, 4, 4]
    a, b = cached.model.state_dict(), frozen.model.state_dict()
    for k in a:  # reason: the tolerance of test_cached_training_equals_uncached_training
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("policy", [fxdrop.Fixed(4, 1), fxdrop.LearnDrop()], ids=["fixed", "default"])
def test_resume_after_interruption_finishes_the_same_run(fmnist, tmp_path, policy):
    full = _fit(fmnist, policy, tmp_path, "full")

    def boom(kind, info):
        if kind == "step" and info["epoch"] == 3 and info["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(fmnist, policy, tmp_path, "crash", on_event=boom)
    ckpt = torch.load(tmp_path / "crash" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["cut"] == full.history[1]["cut"]
    resumed = _fit(fmnist, policy, tmp_path, "crash", resume=True)
    assert len(resumed.history) == 3
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert resumed.final_val_acc == full.final_val_acc


def test_corrupted_shard_is_detected_and_rebuilt(fmnist, tmp_path):
    _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "run", epochs=1, keep_cache=True)
    (folder,) = (tmp_path / "run" / "cache").glob("cut-004-*/train-rank0of1")
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ActivationCache.open(folder, manifest["fingerprint"]) is None
    # a new run with the same cache folder rebuilds it and trains on good data
    again = _fit(
        fmnist,
        fxdrop.Fixed(4, 0),
        tmp_path,
        "run2",
        epochs=1,
        cache_dir=str(tmp_path / "run" / "cache"),
        keep_cache=True,
    )
    assert ActivationCache.open(folder, manifest["fingerprint"]) is not None
    assert again.history[-1]["val_acc"] is not None


def test_exported_model_loads_strictly_and_reproduces_val_acc(fmnist, tmp_path):
    res = _fit(fmnist, fxdrop.Fixed(4, 1), tmp_path, "exp", cache_dtype="bf16", keep_cache=False)
    assert res.cache_bytes > 0 and not (tmp_path / "exp" / "cache").exists()  # removed after the run
    state = load_file(str(tmp_path / "exp" / "model.safetensors"))
    fresh = small_cnn(len(fmnist.classes))
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(fmnist.val), 64):
            xs, ys = zip(*(fmnist.val[j] for j in range(i, min(i + 64, len(fmnist.val)))))
            correct += (fresh(torch.stack(xs)).argmax(-1) == torch.tensor(ys)).sum().item()
    metrics = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    assert correct / len(fmnist.val) == pytest.approx(metrics["final_val_acc"], abs=1e-9)
    assert {"epochs", "events", "total_seconds", "final_val_acc"} <= metrics.keys()
    assert {"epoch", "train_loss", "val_acc", "seconds", "cut", "forward_flops_fraction"} <= metrics[
        "epochs"
    ][0].keys()
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["config"]["cache_dtype"] == "bf16"


def test_optimizer_keeps_state_of_remaining_parameters(fmnist, tmp_path):
    res = _fit(fmnist, fxdrop.Fixed(4, 1), tmp_path, "opt", epochs=2)
    ckpt = torch.load(tmp_path / "opt" / "checkpoint.pt", weights_only=False)
    n_trainable = sum(1 for p in res.model.parameters() if p.requires_grad)
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == n_trainable
    states = ckpt["optimizer"]["state"].values()
    assert states and all("momentum_buffer" in s for s in states)
    assert res.events[0]["removed_from_optimizer"] == sum(
        1 for p in res.model.parameters() if not p.requires_grad
    )


def test_run_folder_with_another_run_is_refused(fmnist, tmp_path):
    _fit(fmnist, fxdrop.NoDrop(), tmp_path, "r", epochs=1)
    with pytest.raises(fxdrop.RunDirError, match="resume=True.*overwrite=True"):
        _fit(fmnist, fxdrop.NoDrop(), tmp_path, "r", epochs=1)
    with pytest.raises(fxdrop.RunDirError, match="different run"):
        _fit(fmnist, fxdrop.NoDrop(), tmp_path, "r", epochs=1, resume=True, seed=1)
    user_file = tmp_path / "r" / "notes.txt"
    user_file.write_text("mine")
    _fit(fmnist, fxdrop.NoDrop(), tmp_path, "r", epochs=1, overwrite=True)
    assert user_file.read_text() == "mine"


def test_foreign_cache_folder_is_refused_and_kept(fmnist, tmp_path):
    cache = tmp_path / "photos"
    cache.mkdir()
    precious = cache / "photo.jpg"
    precious.write_bytes(b"user data")
    with pytest.raises(fxdrop.CacheError, match="photo.jpg"):
        _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "c", epochs=1, cache_dir=str(cache))
    assert precious.read_bytes() == b"user data"
    assert not (tmp_path / "c").exists()  # refused before anything was written
    # the same inside a cut folder fxdrop would write to
    inner = tmp_path / "cache2" / "cut-004-x" / "train-rank0of1"
    inner.mkdir(parents=True)
    (inner / "notes.txt").write_text("mine")
    with pytest.raises(fxdrop.CacheError, match="notes.txt"):
        _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "c", epochs=1, cache_dir=str(tmp_path / "cache2"))
    assert (inner / "notes.txt").read_text() == "mine"


def test_unknown_cut_is_a_clear_error(fmnist, tmp_path):
    with pytest.raises(fxdrop.CutPointError, match="no cut point named 'layer9'"):
        _fit(fmnist, fxdrop.Fixed("layer9", 0), tmp_path, "x", epochs=1)


def test_full_disk_leaves_no_usable_half_cache(tmp_path, monkeypatch):
    import fxdrop.cache.format as fmt

    calls = {"n": 0}
    real = fmt.write_shard

    def failing(path, tensors):  # reason: the second shard's file write finds the disk full
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(fmt, "write_shard", failing)
    monkeypatch.setattr("fxdrop.cache.format._SHARD_BYTES", 1024)
    blocks = ((torch.randn(8, 64), torch.zeros(8), torch.arange(8) + 8 * i, 0) for i in range(4))
    with pytest.raises(fxdrop.CacheError, match="No space left"):
        ActivationCache.write(tmp_path / "c", "fp", blocks, torch.float32)
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert ActivationCache.open(tmp_path / "c", "fp") is None


_COMPILED_INPUTS: list[list[tuple[int, ...]]] = []


def _record_backend(gm, example_inputs):
    """A torch.compile backend that records the shapes of each compiled graph's inputs and runs it eagerly."""
    _COMPILED_INPUTS.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
    return gm.forward


def test_compile_compiles_the_model_then_the_new_suffix_and_trains_the_same(fmnist, tmp_path):
    if "fxdrop_test_record" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_record_backend, name="fxdrop_test_record")
    _COMPILED_INPUTS.clear()
    compiled = _fit(
        fmnist,
        fxdrop.Fixed(4, 1),
        tmp_path,
        "compiled",
        epochs=2,
        cache_dtype="fp32",
        compile="fxdrop_test_record",
    )
    eager = _fit(fmnist, fxdrop.Fixed(4, 1), tmp_path, "eager", epochs=2, cache_dtype="fp32")
    images = (32, 3, 16, 16)  # (B, C, H, W)
    activation = (32, *compiled.graph.cut_points[4].shape)
    first_suffix = next(i for i, shapes in enumerate(_COMPILED_INPUTS) if activation in shapes)
    assert any(images in shapes for shapes in _COMPILED_INPUTS[:first_suffix])  # the whole model first
    assert not any(images in shapes for shapes in _COMPILED_INPUTS[first_suffix:])  # then only the suffix
    a, b = compiled.model.state_dict(), eager.model.state_dict()
    for k in a:
        # reason: an eager backend runs the same kernels; only fusion-free reordering could differ
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_unknown_compile_backend_is_one_clear_error(fmnist, tmp_path):
    with pytest.raises(fxdrop.FxdropError, match="unknown torch.compile backend 'nope'"):
        _fit(fmnist, fxdrop.NoDrop(), tmp_path, "bad", compile="nope")


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="inductor compiles CPU kernels with a C++ compiler; none is installed",
)
def test_inductor_compiled_run_drops_and_learns_like_eager(fmnist, tmp_path):
    compiled = _fit(fmnist, fxdrop.Fixed(4, 1), tmp_path, "inductor", epochs=2, compile="inductor")
    eager = _fit(fmnist, fxdrop.Fixed(4, 1), tmp_path, "eager", epochs=2)
    assert compiled.cut == eager.cut == 4 and compiled.history[1]["cut"] == 4
    # reason: inductor fuses kernels and draws dropout masks from its own generator, so weights
    # differ from eager's; the run must still learn as well (eager: 0.40 on this setup)
    assert compiled.final_val_acc == pytest.approx(eager.final_val_acc, abs=0.1)


def test_a_freeze_only_decision_recomputes_the_prefix_and_builds_no_cache(fmnist, tmp_path, monkeypatch):
    # reason: the decision's arithmetic is tested in test_tiers_cost.py; here, that the engine
    # follows a freeze-only decision: no cache, the prefix frozen and run on the images
    monkeypatch.setattr(
        StepCosts,
        "decide",
        lambda self, cut, last, *a, **k: (
            Decision(4, {"cache": False}, cache=False)
            if cut < 4 <= last
            else Decision(cut, {"decision": "no"}, cache=False)
        ),
    )
    policy = fxdrop.LearnDrop(interval=0.25, left=math.inf, aimless=math.inf, learned=0.0, wait=0.0)
    # reason: the drop as soon as it is allowed (a landing would move it past the run's end)
    res = _fit(fmnist, policy, tmp_path, "fo", epochs=3, landing=0)
    (event,) = res.events
    assert event["cut"] == 4 and not event["cached"] and event["cache_bytes"] == 0
    assert not (tmp_path / "fo" / "cache").exists()
    frozen = [n for n, p in res.model.named_parameters() if not p.requires_grad]
    assert frozen == [n for s in res.graph.segments[:5] for n in s.param_names]


def test_a_cut_reached_freeze_only_is_cached_once_rented_and_trains_what_freeze_only_trains(
    fmnist, tmp_path, monkeypatch
):
    # reason: when to build is tested in test_tiers_cost.py; here, that the engine builds the
    # cache at the current cut when the costs say so, keeps the cut, and trains the same model
    rents = []

    def decide(self, cut, last, steps_left, samples, cached=True, may_cache=True, rent=0.0):
        rents.append(rent)
        if cut < 4 <= last:
            return Decision(4, {"cache": False}, cache=False)
        return Decision(cut, {"rent_s": rent}, cache=rent > 0)

    monkeypatch.setattr(StepCosts, "decide", decide)
    policy = fxdrop.LearnDrop(interval=0.25, left=math.inf, aimless=math.inf, learned=0.0, wait=0.0)
    # the policy allows its furthest cut at once: a cut that will stay is weighed without renting
    _fit(fmnist, policy, tmp_path, "final", epochs=3, cache_dtype="fp32", landing=0)
    assert rents and rents[0] == math.inf
    rents.clear()
    # a policy that does not say how far it may go (the cut may move again): the cache is rented
    monkeypatch.setattr(fxdrop.LearnDrop, "furthest", lambda self, state: None)
    # reason: the drop as soon as it is allowed (a landing would move it past the run's end)
    rented = _fit(fmnist, policy, tmp_path, "rented", epochs=3, cache_dtype="fp32", landing=0)
    metrics = json.loads((tmp_path / "rented" / "metrics.json").read_text())
    (event,) = rented.events
    (built,) = metrics["cache_builds"]
    assert event["cut"] == built["cut"] == 4 and not event["cached"] and built["cache_bytes"] > 0
    assert built["step"] > event["step"] and rents[0] == 0.0 and max(rents) > 0
    assert metrics["cache_build_seconds"] == pytest.approx(built["cache_seconds"], abs=1e-3)
    assert [h["cut"] for h in rented.history][-1] == 4 and (tmp_path / "rented" / "cache").exists()
    monkeypatch.setattr(
        StepCosts,
        "decide",
        lambda self, cut, last, *a, **k: (
            Decision(4, {}, cache=False) if cut < 4 <= last else Decision(cut, {}, cache=False)
        ),
    )
    frozen = _fit(fmnist, policy, tmp_path, "frozen", epochs=3, landing=0)
    a, b = rented.model.state_dict(), frozen.model.state_dict()
    for k in a:  # reason: the tolerance of test_cached_training_equals_uncached_training
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
