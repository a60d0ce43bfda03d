"""Landing: a segment's learning rate annealed to zero before it freezes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import needs_fmnist
from torch import nn

import fxdrop
from fxdrop.data import build_data
from fxdrop.engine.landing import Landings
from fxdrop.engine.step import make_scheduler


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_landing_is_the_step_at_the_annealed_learning_rate_and_leaves_the_rest_alone(name):
    """Against a second path: the same training with the landing layer in its own parameter
    group whose learning rate is set by hand to the cosine from its rate at the landing's start
    to zero at its end (the other group keeps the run's schedule)."""
    steps, start, end = 14, 3, 9
    batches = _batches(steps)

    landed = _toy()
    opt = OPTIMIZERS[name](landed.parameters())
    sched = make_scheduler(opt, steps, 2)
    lands = Landings(landed, [["0.weight", "0.bias"], ["2.weight", "2.bias"]], sched.lr_lambdas[0])
    for t, (x, y) in enumerate(batches):
        if t == start:
            lands.start([0], t, end - start)
        with lands.step(t):
            opt.zero_grad()
            nn.functional.cross_entropy(landed(x), y).backward()
            opt.step()
        sched.step()

    ref = _toy()
    factor = sched.lr_lambdas[0]
    groups = [{"params": list(ref[0].parameters())}, {"params": list(ref[2].parameters())}]
    ropt = OPTIMIZERS[name](groups)
    base = ropt.param_groups[0]["lr"]
    for t, (x, y) in enumerate(batches):
        run = base * factor(t)
        if t < start:
            front = run
        else:  # the cosine from the rate at the start to zero at the end, never above the run's rate
            share = min(1.0, (t - start) / (end - start))
            front = min(run, base * factor(start) * 0.5 * (1 + math.cos(math.pi * share)))
        ropt.param_groups[0]["lr"], ropt.param_groups[1]["lr"] = front, run
        ropt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ropt.step()
    for (k, a), b in zip(landed.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def _moves(landing: bool) -> tuple[Landings, list[list[float]]]:
    """Each step's change of each parameter of the toy, its first layer landing over steps 0-4."""
    model = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lands = Landings(model, [["0.weight", "0.bias"], ["2.weight", "2.bias"]], None)
    if landing:
        lands.start([0], 0, 4)
    moves = []
    for t, (x, y) in enumerate(_batches(8)):
        before = [p.detach().clone() for p in model.parameters()]
        with lands.step(t):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        moves.append(
            [torch.linalg.vector_norm(p.detach() - b).item() for p, b in zip(model.parameters(), before)]
        )
    return lands, moves


def test_a_landed_segment_no_longer_moves_while_the_others_train():
    lands, moves = _moves(landing=True)
    _, free = _moves(landing=False)
    assert lands.landed(1, 4) == 0 and lands.landed(1, 3) == -1
    assert all(m[0] == 0 and m[1] == 0 for m in moves[4:])  # landed: its weights never change again
    assert moves[3][0] < 0.2 * free[3][0]  # its last step before it lands is at a small share of the rate
    assert all(m[2] > 0 for m in moves[4:])  # the other layer keeps training


def test_freezeout_plans_each_segment_to_land_at_its_own_point_and_the_schedule_only_form_none():
    segments = [["a"], [], ["b"], ["c"], ["d"], ["e"]]
    faithful, schedule = fxdrop.FreezeOut(t0=0.5), fxdrop.policies.parse_policy("freezeout-schedule:0.5")
    planned = faithful.landings(faithful.init_state(segments), 100, 1000, 100)
    # five segments with parameters, the last two always train: a, b, c land, front first, from the start
    assert sorted(planned) == [0, 2, 3]
    assert all(start == 0 for start, _ in planned.values())
    assert planned[0][1] == 500 < planned[2][1] < planned[3][1] <= 1000  # t_i = 0.5 + 0.5 (i/5)^3
    assert schedule.landings(schedule.init_state(segments), 100, 1000, 100) == {} and not schedule.land


@pytest.fixture(scope="module")
def fmnist():
    return build_data("fashion-mnist", 16, limit=384, seed=0)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]  # noqa: E731
    return nn.Sequential(
        *block(3, 8), nn.MaxPool2d(2), *block(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    )


def _fit(bundle, tmp, name, **kw):
    kw = {"epochs": 4, "batch_size": 32, "lr": 0.05, "seed": 0, "policy": fxdrop.Fixed(4, 2)} | kw
    return fxdrop.fit(_small_cnn(), bundle.train, bundle.val, out_dir=tmp / name, **kw)


@needs_fmnist
def test_a_fixed_drop_lands_over_the_epoch_before_it_and_freezes_when_its_rate_is_zero(fmnist, tmp_path):
    seen = []

    def watch(kind, info):
        if kind == "step":
            seen.append((info["epoch"], watch.model[0].weight.detach().clone()))

    watch.model = None
    model = _small_cnn()
    watch.model = model
    res = fxdrop.fit(
        model, fmnist.train, fmnist.val, policy=fxdrop.Fixed(4, 2), epochs=4, batch_size=32, lr=0.05, seed=0,
        landing=1.0, on_event=watch,
    )  # fmt: skip
    assert [(e["epoch"], e["cut"]) for e in res.events] == [(3, 4)]  # dropped when fixed, after epoch 2
    moves = [torch.linalg.vector_norm(b - a).item() for (_, a), (_, b) in zip(seen, seen[1:])]
    per_epoch = len(seen) // 4
    landing = moves[per_epoch : 2 * per_epoch - 1]  # epoch 2: the first layer lands
    assert landing[-1] < 0.05 * max(landing[:3])  # its last steps are at almost zero rate
    assert all(m == 0 for m in moves[2 * per_epoch - 1 :])  # frozen from then on, never moved


@needs_fmnist
@pytest.mark.parametrize("policy", ["fixed", "learn-drop"])
def test_resume_in_the_middle_of_a_landing_ends_with_the_same_weights(fmnist, tmp_path, policy):
    # a landing of 1.5 epochs: a checkpoint at an epoch's end falls inside it
    kw = {"landing": 1.5, "epochs": 4}
    if policy == "learn-drop":  # the default policy, with thresholds that let it allow at once
        kw["policy"] = fxdrop.LearnDrop(
            left=math.inf, left_front=None, aimless=math.inf, learned=0.0, window=1, wait=0.0
        )
        kw["cost_model"] = False  # reason: on this toy the step costs may decline any drop
    full = _fit(fmnist, tmp_path, "full", **kw)
    metrics = __import__("json").loads((tmp_path / "full" / "metrics.json").read_text())
    (landing,) = [e for e in metrics["landings"] if e["kind"] == "landing"]
    crash_epoch = (landing["ends_at_step"] - 1) // metrics["steps_per_epoch"] + 1  # its last step's epoch
    assert landing["step"] < (crash_epoch - 1) * metrics["steps_per_epoch"] < landing["ends_at_step"]

    class Interrupt(Exception):
        pass

    def boom(kind, info):
        if kind == "step" and info["epoch"] == crash_epoch and info["step"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(fmnist, tmp_path, "crash", on_event=boom, **kw)
    resumed = _fit(fmnist, tmp_path, "crash", resume=True, **kw)
    assert [e["cut"] for e in resumed.events] == [e["cut"] for e in full.events] != []
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
