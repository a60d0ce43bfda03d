"""Cache tiers and the step costs (behaviour, never timing asserts)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import fxdrop
from fxdrop.cache import CACHE_VERSION, ActivationCache, DiskTier, MemoryTier, choose_tier, place
from fxdrop.cost import MIN_GAIN, StepCosts, segment_seconds


def _write(tmp_path, n=100, views=2, shard_bytes=None, monkeypatch=None):
    """A cache whose x encodes (view, sample): x[:, 0] = 1000 * view + idx, and y = idx % 3."""
    if shard_bytes and monkeypatch:
        monkeypatch.setattr("fxdrop.cache.format._SHARD_BYTES", shard_bytes)
    blocks = [
        (
            torch.full((10, 4), float(v * 1000 + i * 10)) + torch.arange(10)[:, None],
            (torch.arange(10) + 10 * i) % 3,
            torch.arange(10) + 10 * i,
            v,
        )
        for v in range(views)
        for i in range(n // 10)
    ]
    return ActivationCache.write(tmp_path / "c", "fp", iter(blocks), torch.float32)


def test_disk_tier_keeps_x_with_y_visits_every_sample_once_and_shuffles_within_the_window(
    tmp_path, monkeypatch
):
    cache, arrays = _write(tmp_path, shard_bytes=4 * 4 * 10, monkeypatch=monkeypatch)  # one block per shard
    assert len(cache.manifest["shards"]) == 20
    disk = DiskTier(cache, window=3)
    seen = []
    for epoch in range(2):
        order = torch.randperm(100, generator=torch.Generator().manual_seed(epoch))
        batches = list(disk.batches(order, 16, view=1, device=torch.device("cpu")))
        assert all(len(x) == 16 for x, _ in batches[:-1])
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        idx = (x[:, 0] - 1000).long()  # view 1 only
        assert sorted(idx.tolist()) == list(range(100))  # every sample once
        assert torch.equal(y, idx % 3)  # every x still with its own y
        # within a window of 3 shards (30 samples) the order follows `order`: the first window
        # holds the shards whose first sample comes earliest in this epoch
        seen.append(idx)
    assert not torch.equal(seen[0], seen[1])  # reshuffled every epoch
    assert not torch.equal(seen[0], torch.arange(100))


def test_disk_tier_follows_the_epoch_order_as_far_as_windows_allow(tmp_path, monkeypatch):
    cache, _ = _write(tmp_path, views=1, shard_bytes=4 * 4 * 10, monkeypatch=monkeypatch)
    order = torch.arange(99, -1, -1)  # reversed
    x = torch.cat([b[0] for b in DiskTier(cache, window=2).batches(order, 7, 0, torch.device("cpu"))])
    assert x[:, 0].long().tolist() == list(range(99, -1, -1))  # shards and samples in that order


def test_memory_tier_gathers_the_requested_order(tmp_path):
    _, arrays = _write(tmp_path)
    mem = MemoryTier(arrays, "memory")
    order = torch.randperm(100)
    xs, ys = zip(*mem.batches(order, 32, 0, torch.device("cpu")))
    assert torch.equal(torch.cat(xs), arrays.x[0][order]) and torch.equal(torch.cat(ys), arrays.y[order])


def test_fp16_cache_round_trips(tmp_path):
    blocks = [(torch.randn(10, 4), torch.arange(10) % 3, torch.arange(10), 0)]
    cache, arrays = ActivationCache.write(tmp_path / "c", "fp", iter(blocks), torch.float16)
    assert cache.manifest["dtype"] == "fp16" and arrays.x.dtype == torch.float16
    again = ActivationCache.open(tmp_path / "c", "fp").load()
    assert torch.equal(again.x, blocks[0][0].half()[None]) and torch.equal(again.y, blocks[0][1])


def test_damaged_manifest_in_a_cache_folder_is_rebuilt_not_refused(tmp_path):
    cache, _ = _write(tmp_path, n=20, views=1)
    manifest = tmp_path / "c" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # truncated
    assert ActivationCache.open(tmp_path / "c", "fp") is None  # not trusted, and not an error
    _write(tmp_path, n=20, views=1)
    assert ActivationCache.open(tmp_path / "c", "fp") is not None


def test_a_cache_of_another_format_version_is_rebuilt_never_read(tmp_path):
    _write(tmp_path, n=20, views=1)
    manifest = tmp_path / "c" / "manifest.json"
    text = manifest.read_text()
    assert f'"version": {CACHE_VERSION}' in text
    manifest.write_text(text.replace(f'"version": {CACHE_VERSION}', f'"version": {CACHE_VERSION - 1}'))
    assert ActivationCache.open(tmp_path / "c", "fp") is None


def test_appended_and_forgotten_samples_are_read_by_key_from_every_tier(tmp_path, monkeypatch):
    cache, _ = _write(tmp_path, n=40, views=2, shard_bytes=4 * 4 * 10, monkeypatch=monkeypatch)  # keys 0..39
    files = sorted(f.name for f in (tmp_path / "c").glob("shard-*"))
    new = [
        (
            torch.full((10, 4), float(v * 1000 + 40)) + torch.arange(10)[:, None],
            (torch.arange(10) + 40) % 3,
            torch.arange(40, 50),
            v,
        )
        for v in range(2)
    ]  # keys 40..49, x encodes them as the others do
    assert cache.append(iter(new)) == 10
    assert (
        sorted(f.name for f in (tmp_path / "c").glob("shard-*"))[: len(files)] == files
    )  # nothing rewritten
    assert cache.forget([3, 7, 99]) == 2 and cache.live_keys() == set(range(50)) - {3, 7}
    again = ActivationCache.open(tmp_path / "c", "fp")
    keys = torch.tensor([45, 0, 12, 41, 39, 20])  # some old, some appended, in any order
    rows = again.rows_of(keys)
    for tier in ("memory", "disk"):
        placed = place(again, tier, torch.device("cpu"), rows)
        for view in (0, 1):
            order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(view))
            xs, ys = zip(*placed.batches(order, 4, view, torch.device("cpu")))
            x, y = torch.cat(xs), torch.cat(ys)
            got = (x[:, 0] - 1000 * view).long()  # the key each row was written for
            assert sorted(got.tolist()) == sorted(keys.tolist()) and torch.equal(y, got % 3), tier
        blocks = list(placed.blocks(4))
        assert sorted(torch.cat([b[2] for b in blocks if b[3] == 0]).tolist()) == sorted(keys.tolist())


def test_choose_tier_picks_the_fastest_that_fits():
    gib = 2**30
    assert choose_tier(1 * gib, torch.device("cuda", 0), host_free=64 * gib, device_free=40 * gib) == "device"
    assert (
        choose_tier(30 * gib, torch.device("cuda", 0), host_free=64 * gib, device_free=40 * gib) == "pinned"
    )
    assert choose_tier(1 * gib, torch.device("cpu"), host_free=8 * gib) == "memory"
    assert choose_tier(5 * gib, torch.device("cpu"), host_free=8 * gib) == "disk"


def test_forced_disk_tier_trains(tmp_path):
    from test_fit import small_cnn

    from fxdrop.data import build_data

    bundle = build_data("fashion-mnist", 16, limit=256, seed=0)
    model = small_cnn(len(bundle.classes))
    res = fxdrop.fit(
        model,
        bundle.train,
        bundle.val,
        policy=fxdrop.Fixed(3, 0),
        epochs=2,
        batch_size=32,
        lr=0.05,
        cache_tier="disk",
        out_dir=tmp_path / "run",
    )
    assert res.events[0]["cache_tier"] == "disk"
    assert res.history[-1]["val_acc"] > 0.2


@pytest.fixture(scope="module")
def resnet():
    model = timm.create_model("resnet18", num_classes=10)
    return fxdrop.trace(model, torch.randn(2, 3, 32, 32))


def _costs(dg, bandwidth=1e10, **kw):
    # reason: the arithmetic is under test, not the clock: every segment's forward costs 1 ms
    # per FLOP share of the model, so deeper cuts are cheaper
    share = [
        (
            dg.cut_points[0].prefix_flops
            if s == 0
            else (dg.cut_points[s].prefix_flops - dg.cut_points[s - 1].prefix_flops)
            if s < len(dg.cut_points)
            else dg.cut_points[-1].suffix_flops
        )
        / dg.total_flops
        for s in range(len(dg.segments))
    ]
    return StepCosts(dg, [0.1 * f for f in share], 32, lambda k: bandwidth, **kw)


def test_segment_timing_leaves_the_model_untouched(resnet):
    model = resnet.model
    model.eval()
    model.layer1.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(8, 3, 32, 32)  # (B, C, H, W)
    rng = torch.get_rng_state()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # a gradient the last step left
    forward, train = segment_seconds(resnet, x)
    assert len(forward) == len(train) == len(resnet.segments) and all(t > 0 for t in forward)
    assert sum(train) > sum(forward)  # a backward is measured, not free
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    model.train()  # as during training, where the first decision times the segments
    segment_seconds(resnet, x)
    assert all(m.training for m in model.modules())  # a model left in eval would train on running stats
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm stats included
    assert not model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(torch.get_rng_state(), rng)
    model.layer1.requires_grad_(True)
    model.fc.weight.grad = None


def test_candidates_are_one_per_frozen_parameter_set(resnet):
    costs = _costs(resnet)
    last = len(resnet.cut_points) - 2
    every = costs.candidates(-1, last)
    frozen = [resnet.cut_points[k].prefix_params for k in every]
    assert len(set(frozen)) == len(frozen)  # no two candidates freeze the same parameters
    assert {resnet.cut_points[k].prefix_params for k in range(last + 1)} == set(
        frozen
    )  # every choice covered


def test_the_observed_step_corrects_the_prediction_at_the_current_cut(resnet):
    costs = _costs(resnet)
    cut = resnet.cut_point("layer2").index
    costs.observe(cut, step_s=0.5, wait_s=0.01)
    # the compute part now matches what was measured; the input part is the tier's prediction
    assert costs.step_s(cut) == pytest.approx(0.5 - 0.01 + costs.input_s(cut), rel=1e-9)
    deeper = resnet.cut_point("layer3").index
    assert costs.step_s(deeper) < costs.step_s(cut)


def test_a_drop_that_would_make_the_step_slower_is_refused(resnet):
    slow_disk = _costs(resnet, bandwidth=1e3)  # 1 kB/s: moving activations dominates
    seg = resnet.cut_point("layer1").index
    d = slow_disk.decide(-1, seg, steps_left=100, samples=1000, may_cache=True)
    assert not d.cache  # reading the cache would be slower than recomputing the prefix
    slow_disk.forward_s = [0.0] * (len(slow_disk.forward_s) - 1) + [1.0]  # the head is all the work
    slow_disk.declined.clear()
    d = slow_disk.decide(-1, seg, steps_left=100, samples=1000)
    assert d.cut == -1 and d.why["predicted_step_s"] >= (1 - MIN_GAIN) * d.why["predicted_step_s_before"]
    fast = _costs(resnet)
    d = fast.decide(-1, seg, steps_left=100, samples=1000)
    assert (
        d.cut >= 0
        and d.why["predicted_step_s"] < d.why["predicted_step_s_before"]
        and d.why["predicted_saving_s"] > 0
    )


def test_a_cache_that_cannot_pay_off_is_not_built_freeze_only_instead(resnet):
    costs = _costs(resnet, image_wait_s=0.01)
    seg = resnet.cut_point("layer3").index
    d = costs.decide(-1, seg, steps_left=1, samples=1_000_000)  # one step left, a million samples to cache
    assert d.cut > -1 and not d.cache and d.why["predicted_build_s"] == 0  # the prefix recomputed instead
    assert costs.step_s(d.cut, cached=False) < costs.step_s(-1)
    build = costs.build_s(-1, seg, 1_000)
    d = costs.decide(-1, seg, steps_left=10_000, samples=1_000, rent=build)
    assert d.cut > -1 and d.cache and d.why["predicted_saving_s"] > 0  # a long run repays its cache
    d = costs.decide(-1, seg, steps_left=1, samples=1_000_000, may_cache=False, rent=1e9)
    assert not d.cache


def test_a_cache_from_the_images_is_rented_first_then_built_at_the_current_cut(resnet):
    """Freeze-only until freeze-only has cost as much as the cache would; then the cache, without
    moving the cut. A long run does not skip the rent: the cut may move again before a cache
    repays itself."""
    costs = _costs(resnet, image_wait_s=0.01)
    seg = resnet.cut_point("layer3").index
    first = costs.decide(-1, seg, steps_left=10_000, samples=1_000)
    assert first.cut > -1 and not first.cache and first.why["predicted_build_s"] == 0
    cut, build = first.cut, costs.build_s(-1, first.cut, 1_000)
    waiting = costs.decide(cut, cut, steps_left=9_000, samples=1_000, cached=False, rent=0.9 * build)
    assert (
        waiting.cut == cut
        and not waiting.cache
        and waiting.why["decision"].startswith("a cache is not rented")
    )
    assert costs.decide(cut, cut, steps_left=8_000, samples=1_000, cached=False, rent=0.95 * build).why.get(
        "repeat"
    )
    paid = costs.decide(cut, cut, steps_left=8_000, samples=1_000, cached=False, rent=build)
    assert (
        paid.cut == cut and paid.cache and paid.why["predicted_step_s"] < paid.why["predicted_step_s_before"]
    )
    # a build from an existing cache (only the segments between) is not rented
    deeper = resnet.cut_point("layer4").index
    assert costs.decide(cut, deeper, steps_left=8_000, samples=1_000, cached=True).cache


def _toy_costs(forward_s=(1.0, 0.0, 1.0, 0.0, 1.0), train_s=(3.0, 0.0, 3.0, 0.0, 3.0), **kw) -> StepCosts:
    """Round numbers by hand on a toy of five segments (conv, relu, conv, flatten, linear head; the
    candidate cuts are 1 and 3): by default each conv and the head take 1 s forward and 3 s
    forward and backward, a cached sample is 100 bytes read at 1000 B/s, so reading a batch of
    10 from a cache takes 1 s."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model.extend([nn.Flatten(), nn.Linear(4 * 8 * 8, 2)])
    dg = fxdrop.trace(model, torch.randn(2, 3, 8, 8))
    kw = {"bandwidth": lambda k: 1000.0, "sample_bytes": lambda k: 100} | kw
    return StepCosts(dg, list(forward_s), 10, train_s=list(train_s), **kw)


def test_a_slow_cache_loses_to_freeze_only_by_hand():
    costs = _toy_costs(bandwidth=lambda k: 10.0)  # a cached batch takes 100 s to read
    # the whole model: 9 s; freeze-only at 1: 6 + 1 s, at 3: 3 + 2 s; cached: 106 s and 103 s
    d = costs.decide(-1, 3, steps_left=100, samples=1000)
    assert (d.cut, d.cache) == (3, False)
    assert (d.why["predicted_step_s"], d.why["predicted_step_s_before"]) == (5.0, 9.0)


def test_a_drop_saving_less_than_min_gain_is_declined_by_hand():
    # the head is nearly all the work: freeze-only at 1 or 3 takes 9.0 s of 9.0 s, a cache 1 s more
    costs = _toy_costs(forward_s=(0.1, 0.0, 0.1, 0.0, 2.9), train_s=(0.1, 0.0, 0.1, 0.0, 8.8))
    d = costs.decide(-1, 3, steps_left=10_000, samples=10)
    assert d.cut == -1 and d.why["decision"].startswith("no candidate is faster enough")


def test_build_estimate_learns_the_write_rate_from_the_builds_done():
    costs = _toy_costs(image_wait_s=0.5)
    # 100 batches of (0.5 s images + 1 s forward), then 1000 x 100 bytes at the default 1 GB/s
    assert costs.build_s(-1, 1, 1000) == pytest.approx(150.0001)
    costs.built(-1, 1, 1000, seconds=200.0)  # writing 1e5 bytes took 50 s
    assert costs.write_bytes_per_s == pytest.approx(2000.0)
    assert costs.build_s(-1, 1, 1000) == pytest.approx(200.0)
    # a later build from the cache: no images, only segment 2's forward (100 s), the same 50 s of writing
    assert costs.build_s(1, 3, 1000) == pytest.approx(150.0)
    assert costs.build_s(-1, 3, 1000) == pytest.approx(300.0)  # 100 x (0.5 + 2) + 50


def test_a_large_early_cache_that_writing_cannot_repay_is_refused(resnet):
    costs = _costs(resnet)
    costs.write_bytes_per_s = 1e6  # 1 MB/s: writing the early activations dominates
    conv1 = resnet.cut_point("conv1").index
    assert costs.decide(-1, conv1, steps_left=100, samples=10_000).cut == -1


def test_a_declined_choice_is_not_reconsidered_with_fewer_steps_left(resnet):
    costs = _costs(resnet, bandwidth=1e3)  # a cache never pays
    costs.forward_s = [0.0] * (len(costs.forward_s) - 1) + [
        1.0
    ]  # and neither does freeze-only: all work is in the head
    seg = resnet.cut_point("layer2").index
    assert costs.decide(-1, seg, steps_left=100, samples=100).cut == -1
    again = costs.decide(-1, seg, steps_left=90, samples=100)
    assert again.cut == -1 and again.why["decision"].startswith("declined before")
    assert (
        "predicted_step_s"
        in costs.decide(-1, resnet.cut_point("layer3").index, steps_left=80, samples=100).why
    )


def test_at_the_furthest_cut_a_policy_allows_a_cache_is_built_at_once_when_it_pays(resnet):
    """A cut that will move no more (the policy's `furthest`) is no bet: the cache is weighed on
    the steps left, not rented first; in a run too short to repay it, freeze-only still wins."""
    costs = _costs(resnet, image_wait_s=0.01)
    seg = resnet.cut_point("layer3").index
    at_once = costs.decide(-1, seg, steps_left=10_000, samples=1_000, rent=math.inf)
    assert at_once.cut > -1 and at_once.cache and at_once.why["predicted_build_s"] > 0
    short = costs.decide(-1, seg, steps_left=2, samples=1_000, rent=math.inf)
    assert not short.cache
    state = fxdrop.LearnDrop().init_state([list(s.param_names) for s in resnet.segments])
    furthest = fxdrop.LearnDrop().furthest(state)
    assert 0 <= furthest < len(resnet.segments) - 1 and fxdrop.NoDrop().furthest(state) is None
