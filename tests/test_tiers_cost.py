"""Cache tiers and the cost model (behaviour, never timing asserts)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch

import fxdrop
from fxdrop.cache import ActivationCache, DiskCacheData, choose_tier
from fxdrop.costmodel import DropCost, StepTimer, measure_cost
from fxdrop.train import _candidates, _choose_cut


def _write(tmp_path, n=100, views=2, shard_bytes=None, monkeypatch=None):
    if shard_bytes and monkeypatch:
        monkeypatch.setattr("fxdrop.cache._SHARD_BYTES", shard_bytes)
    blocks = [(torch.full((10, 4), float(v * 1000 + i * 10)) + torch.arange(10)[:, None], torch.arange(10) % 3,
               torch.arange(10) + 10 * i, v) for v in range(views) for i in range(n // 10)]
    return ActivationCache.write(tmp_path / "c", "fp", iter(blocks), torch.float32)


def test_disk_tier_visits_every_sample_once_per_epoch_with_shuffling(tmp_path, monkeypatch):
    cache, mem = _write(tmp_path, shard_bytes=4 * 4 * 10, monkeypatch=monkeypatch)  # one block per shard
    assert len(cache.manifest["shards"]) == 20
    disk = DiskCacheData(cache, window=3)
    seen = []
    for epoch in range(2):
        order = torch.randperm(100, generator=torch.Generator().manual_seed(epoch))
        xs = [x for x, _ in disk.batches(order, 16, view=1)]
        assert all(len(x) == 16 for x in xs[:-1])
        vals = torch.cat(xs)[:, 0]
        # view 1 only, every sample once
        assert sorted(vals.tolist()) == sorted(mem.x[1][:, 0].tolist())
        seen.append(vals)
    assert not torch.equal(seen[0], seen[1])  # reshuffled every epoch


def test_memory_tier_gathers_the_requested_order(tmp_path):
    _, mem = _write(tmp_path)
    order = torch.randperm(100)
    xs, ys = zip(*mem.batches(order, 32, view=0))
    assert torch.equal(torch.cat(xs), mem.x[0][order]) and torch.equal(torch.cat(ys), mem.y[order])
    assert mem.tier == "memory"


def test_choose_tier_picks_the_fastest_that_fits():
    gib = 2**30
    assert choose_tier(1 * gib, torch.device("cuda", 0), host_free=64 * gib, device_free=40 * gib) == "device"
    assert choose_tier(30 * gib, torch.device("cuda", 0), host_free=64 * gib, device_free=40 * gib) == "pinned"
    assert choose_tier(1 * gib, torch.device("cpu"), host_free=8 * gib) == "memory"
    assert choose_tier(5 * gib, torch.device("cpu"), host_free=8 * gib) == "disk"


def test_forced_disk_tier_trains(tmp_path):
    from fxdrop.data import build_data
    from test_fit import small_cnn

    bundle = build_data("fashion-mnist", 16, limit=256, seed=0)
    model = small_cnn(len(bundle.classes))
    res = fxdrop.fit(model, bundle.train, bundle.val, policy=fxdrop.Fixed(3, 0), epochs=2, batch_size=32,
                     lr=0.05, cache_tier="disk", out_dir=tmp_path / "run")
    assert res.events[0]["cache_tier"] == "disk"
    assert res.history[-1]["val_acc"] > 0.2


@pytest.fixture(scope="module")
def resnet_cost():
    model = timm.create_model("resnet18", num_classes=10)
    dg = fxdrop.trace(model, torch.randn(2, 3, 32, 32))
    return dg, measure_cost(dg, batch_size=32, device=torch.device("cpu"), tier="memory")


def test_measured_cost_model_is_sane(resnet_cost):
    dg, cost = resnet_cost
    assert cost.flops_per_s > 0 and cost.fixed_s >= 0 and cost.read_bytes_per_s > 0
    full = cost.step_seconds(None)
    steps = [cost.step_seconds(cp) for cp in dg.cut_points]
    assert all(s < full for s in steps[4:])  # past the stem, every cached cut beats the full step
    for cp in dg.cut_points:
        assert cost.ideal_seconds(cp) <= cost.step_seconds(cp) <= cost.step_seconds(cp, cached=False) + cost.fixed_s + 1


@pytest.fixture(scope="module")
def drop_cost(resnet_cost):
    dg, _ = resnet_cost
    return DropCost(dg, StepTimer(dg, 32, torch.device("cpu"), steps=3), bandwidth=lambda k: 1e10)


def test_step_timer_leaves_the_model_untouched_and_remembers(resnet_cost):
    dg, _ = resnet_cost
    model = dg.model
    model.eval()
    model.layer1.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    timer = StepTimer(dg, 8, torch.device("cpu"))
    t = timer.step_seconds(dg.cut_point("layer2").index)
    together = timer.time_cuts([-1, 3, dg.cut_point("layer3").index])  # interleaved rounds
    assert t > 0 and set(together) == {-1, 3, dg.cut_point("layer3").index} and all(v > 0 for v in together.values())
    assert timer.step_seconds(dg.cut_point("layer2").index) == t  # remembered, not re-timed
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm stats included
    assert not model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    model.layer1.requires_grad_(True)


def test_candidates_are_one_per_frozen_parameter_set_spread_to_the_deepest(resnet_cost):
    dg, _ = resnet_cost
    last = len(dg.cut_points) - 2
    every = _candidates(dg, -1, last, most=100)
    frozen = [dg.cut_points[k].prefix_params for k in every]
    assert len(set(frozen)) == len(frozen)  # no two candidates freeze the same parameters
    assert {dg.cut_points[k].prefix_params for k in range(last + 1)} == set(frozen)  # every choice is covered
    few = _candidates(dg, -1, last, most=4)
    assert len(few) == 4 and few[-1] == every[-1] and set(few) <= set(every)
    assert _candidates(dg, -1, last, most=1) == every[-1:]


def test_slow_steps_and_few_steps_left_time_fewer_candidates(resnet_cost):
    dg, _ = resnet_cost
    cost = DropCost(dg, StepTimer(dg, 8, torch.device("cpu")), bandwidth=lambda k: 1e10, observed_step_s=0.01)
    seg = dg.cut_point("layer4").index
    # bound = 100 steps x 10 ms x ~99% frozen = ~1 s; one cut's timing (warm-up + 2 steps) = 30 ms:
    # half the bound pays for 16 cuts, so all 4 candidates are timed
    _, why = _choose_cut(dg, seg, -1, cost, steps_left=100, samples=100)
    assert len(why["timed_cuts"]) == 4
    deepest = why["timed_cuts"][-1]
    # 14 steps left: ~0.14 s, half of it pays for the current cut and 1 candidate, the deepest
    cost.declined.clear()
    _, why = _choose_cut(dg, seg, -1, cost, steps_left=14, samples=100)
    assert why["timed_cuts"] == [deepest]


def test_cost_model_refuses_a_drop_that_would_be_slower(resnet_cost, drop_cost):
    dg, _ = resnet_cost
    slow_disk = replace(drop_cost, bandwidth=lambda k: 1e3, declined={})  # 1 kB/s: moving activations dominates
    drop_cost = replace(drop_cost, declined={})
    seg = dg.cut_point("layer1").index
    new, why = _choose_cut(dg, seg, -1, slow_disk, steps_left=100, samples=1000)
    assert new == -1 and why["predicted_step_s"] >= why["predicted_step_s_before"]
    new, why = _choose_cut(dg, seg, -1, drop_cost, steps_left=100, samples=1000)
    assert new >= 0 and why["predicted_step_s"] < why["predicted_step_s_before"] and why["predicted_saving_s"] > 0
    # never a cut slower than the one it replaces
    for cur in (-1, 3, 8, 14):
        new, _ = _choose_cut(dg, len(dg.cut_points) - 2, cur, drop_cost, steps_left=100, samples=1000)
        assert new == cur or drop_cost.step_seconds(new) < drop_cost.step_seconds(cur)


def test_cost_model_refuses_a_drop_whose_cache_cannot_pay_off(resnet_cost, drop_cost):
    dg, _ = resnet_cost
    drop_cost = replace(drop_cost, declined={})
    seg = dg.cut_point("layer3").index
    # one step left and a million samples to cache: building costs more than it saves
    new, why = _choose_cut(dg, seg, -1, drop_cost, steps_left=1, samples=1_000_000)
    assert new == -1 and why["predicted_saving_s"] <= 0
    new, why = _choose_cut(dg, seg, -1, drop_cost, steps_left=10_000, samples=1_000)
    assert new > -1 and why["predicted_saving_s"] > 0 and len(why["timed_cuts"]) <= 4


def test_build_estimate_is_calibrated_by_the_builds_done(resnet_cost):
    dg, _ = resnet_cost
    cost = DropCost(dg, StepTimer(dg, 16, torch.device("cpu")), bandwidth=lambda k: 1e10, image_step_s=0.01)
    early, late = dg.cut_point("layer2").index, dg.cut_point("layer4").index
    # reason: the formula is under test, not the clock: the steps the timer remembers are set here
    cost.timer.train_s.update({-1: 0.30, early: 0.21, late: 0.06})
    first = cost.build_seconds(-1, early, 1000)
    assert first > 1000 * 0.01 / 16  # loading the images, plus the prefix forward
    assert first == pytest.approx(1000 * (0.01 + (0.30 - 0.21) / 3) / 16)  # a forward is a third of a step
    cost.built(-1, early, 1000, seconds=3 * first)  # the real build took 3x the estimate
    assert cost.build_factor == pytest.approx(3)
    assert cost.build_seconds(-1, early, 1000) == pytest.approx(3 * first)
    assert 0 < cost.build_seconds(early, late, 1000) < cost.build_seconds(-1, late, 1000)  # no image loading
    assert cost.build_seconds(early, late, 1000) == pytest.approx(3 * 1000 * ((0.21 - 0.06) / 3) / 16)


def test_candidates_are_not_timed_when_even_the_best_case_cannot_repay_it(resnet_cost):
    dg, _ = resnet_cost
    cost = DropCost(dg, StepTimer(dg, 32, torch.device("cpu")), bandwidth=lambda k: 1e10, observed_step_s=0.1)
    seg = dg.cut_point("layer4").index
    new, why = _choose_cut(dg, seg, -1, cost, steps_left=2, samples=100)
    assert new == -1 and not cost.timer.train_s  # nothing was timed
    assert why["predicted_saving_bound_s"] < 2 * why["timing_cost_s"]  # timing may spend half the bound
    new, why = _choose_cut(dg, seg, -1, cost, steps_left=10_000, samples=100)
    assert new > -1 and len(cost.timer.train_s) == len(why["timed_cuts"]) + 1  # the candidates and the current cut


def test_a_declined_choice_is_not_timed_again(resnet_cost):
    dg, _ = resnet_cost
    cost = DropCost(dg, StepTimer(dg, 8, torch.device("cpu")), bandwidth=lambda k: 1e3)  # 1 kB/s: never pays
    seg = dg.cut_point("layer2").index
    new, why = _choose_cut(dg, seg, -1, cost, steps_left=100, samples=100)
    assert new == -1 and "predicted_step_s" in why
    cost.timer.train_s.clear()
    new, why = _choose_cut(dg, seg, -1, cost, steps_left=90, samples=100)
    assert new == -1 and not cost.timer.train_s and why["decision"].startswith("declined before")
    new, _ = _choose_cut(dg, dg.cut_point("layer3").index, -1, cost, steps_left=80, samples=100)
    assert cost.timer.train_s  # a new allowance is timed afresh
