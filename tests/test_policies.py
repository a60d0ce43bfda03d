"""Drop policies on synthetic learning trajectories (no training): front to back, invariant to
the learning-rate schedule, nothing dropped while learning, warm-up and the head respected."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import fxdrop
from fxdrop.policies import AutoFreeze, FreezeOut, LearnDrop
from fxdrop.records import Drop, Epoch

SEGMENTS = 6  # segments with parameters, one Linear-sized block each


class Learner(nn.Module):
    """Parameters moved by hand, one observation (an epoch) at a time. Segment s moves by
    `lr * (speed_s(u) * its direction + noise)` relative to its size, where u is the learning rate
    used so far: it learns at `speed_s(u) = rate[s] / (1 + u / tau[s])^2` (slower and slower; `tau`
    None: at `rate[s]` forever; `stop` set: at `rate[s]` until u reaches it, then not at all), and
    minibatch noise moves it across at every step (a random walk of `noise` per unit of learning
    rate)."""

    def __init__(
        self,
        tau: list[float | None],
        stop: list[float | None] | None = None,
        noise: float = 0.5,
        rate: list[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in tau)
        self.tau, self.stop, self.noise = tau, stop or [None] * len(tau), noise
        self.rate = rate or [1.0] * len(tau)
        self.g = torch.Generator().manual_seed(seed)
        self.direction = [torch.randn(64 * 64, generator=self.g) for _ in tau]
        self.used = 0.0

    def speed(self, s: int) -> float:
        if self.stop[s] is not None:
            return self.rate[s] if self.used < self.stop[s] else 0.0
        return self.rate[s] * (1.0 if self.tau[s] is None else (1 + self.used / self.tau[s]) ** -2)

    @torch.no_grad()
    def move(self, lr: float) -> None:
        for s, block in enumerate(self.blocks):
            w = block.weight.view(-1)
            noise = torch.randn(w.shape, generator=self.g)
            step = (
                self.speed(s) * self.direction[s] / self.direction[s].norm()
                + self.noise * noise / noise.norm()
            )
            w += 0.05 * lr * step * w.norm()
        self.used += lr


def _segments(model: Learner) -> list[list[str]]:
    return [[f"blocks.{s}.weight", f"blocks.{s}.bias"] for s in range(len(model.blocks))]


def cosine(epochs: int, lr: float = 1.0, warmup: int = 1) -> list[float]:
    """A run's learning rate per epoch: a linear warm-up, then a cosine decay."""
    return [
        lr * (e + 1) / (warmup + 1)
        if e < warmup
        else lr * 0.5 * (1 + math.cos(math.pi * (e - warmup + 0.5) / (epochs - warmup)))
        for e in range(epochs)
    ]


def _run(policy, model, lrs, loss=lambda e: 2.0 * math.exp(-e / 3), told_left=None) -> list[int]:
    """The cut before every epoch after the first, as the engine moves it (only forward) on what
    the policy answers, told the learning rate still to come (or `told_left(e)`)."""
    state = policy.init_state(_segments(model))
    policy.begin(state, model)
    cut, out = -1, []
    for e, lr in enumerate(lrs):
        model.move(lr)
        policy.observe(state, model, lr, loss(e))
        policy.plan(state, told_left(e) if told_left else sum(lrs[e + 1 :]))
        cut = max(cut, policy.target(state, e + 1, len(lrs), cut)[0])
        out.append(cut)
    return out


def _first(decisions: list[int], seg: int) -> int | None:
    """The first epoch (1-based) before which segment `seg` may be dropped."""
    return next((e + 2 for e, d in enumerate(decisions) if d >= seg), None)


def test_learndrop_drops_a_segment_that_stopped_and_keeps_one_that_learns_slowly():
    # segment 0 stops early; segment 1 keeps learning all run at a third of the others' speed
    slow = Learner(tau=[None] * 5, stop=[1.5, None, None, None, None], rate=[1.0, 0.3, 1.0, 1.0, 1.0])
    decisions = _run(LearnDrop(), slow, cosine(30))
    assert max(decisions) == 0  # the stopped front segment drops, the slow learner behind it never
    assert _first(decisions, 0) == _waited(cosine(30))  # as soon as the run's learning rate allows


def _waited(lrs: list[float], wait: float = LearnDrop.wait) -> int:
    """The first epoch (1-based, as `_first`) before which LearnDrop's `wait` allows a drop."""
    return next(e + 2 for e in range(len(lrs)) if sum(lrs[: e + 1]) >= wait * sum(lrs))


def test_learndrop_waits_for_its_share_of_the_run_s_learning_rate():
    """A front that stops at once is still not dropped before `wait` of the run's learning rate is
    used, from scratch or trained, in a short run or a long one; then it is dropped at once."""
    for lrs in (cosine(6), cosine(30), [0.1] * 20):
        for policy in (LearnDrop(), LearnDrop(trained_front=True)):
            stopped = Learner(tau=[None] * 5, stop=[0.01, None, None, None, None])
            decisions = _run(policy, stopped, lrs)
            assert _first(decisions, 0) == _waited(lrs), (lrs, policy.trained_front)


def test_learndrop_drops_nothing_in_a_run_whose_segments_never_settle():
    assert set(_run(LearnDrop(), Learner(tau=[None] * 5), cosine(30))) == {-1}
    assert set(_run(LearnDrop(), Learner(tau=[None] * 5), cosine(6))) == {-1}


@pytest.mark.parametrize("lrs", [[0.1] * 20, [0.1] * 10 + [0.01] * 10], ids=["constant", "step-decay"])
def test_learndrop_a_learning_rate_decay_alone_triggers_nothing(lrs):
    """Segments that keep learning at their speed per unit of learning rate: a decay of the rate
    slows their moves but is not read as settling (the rest of the run still holds as much
    learning rate: here a long run ahead)."""
    decisions = _run(LearnDrop(), Learner(tau=[None] * 5), lrs, told_left=lambda e: 2.0)
    assert set(decisions) == {-1}


def test_learndrop_places_the_same_trajectory_s_drops_later_in_longer_runs():
    firsts = []
    for epochs in (10, 20, 40):
        model = Learner(tau=[0.5, 1.0, 2.0, 4.0, None], seed=1)  # learning that slows, the front first
        decisions = _run(LearnDrop(), model, cosine(epochs, lr=0.4))
        assert max(decisions) <= 2  # the last learner stays
        firsts.append(_first(decisions, 0))
    assert None not in firsts and firsts[0] < firsts[1] < firsts[2], firsts


def test_learndrop_drops_front_to_back_and_never_a_segment_before_one_that_learns():
    model = Learner(tau=[None, 0.3, 0.3, 0.3, None])  # a learning front keeps its settled followers training
    assert set(_run(LearnDrop(), model, cosine(30))) == {-1}


def test_learndrop_waits_for_the_network_to_learn():
    stopped = Learner(tau=[0.01] * 5)
    assert set(_run(LearnDrop(), stopped, cosine(20), loss=lambda e: 2.3)) == {-1}  # the loss never fell
    assert max(_run(LearnDrop(), Learner(tau=[0.01] * 5), cosine(20))) >= 0


class Normed(Learner):
    """A Learner whose every block is followed by a normalisation segment of its own (a 1-D
    scale), and whose biases and scales drift steadily in one direction all run, as a BatchNorm's
    affine parameters follow its batch statistics (VGG-11-BN, docs/benchmarks.md)."""

    def __init__(self, tau: list[float | None], seed: int = 0) -> None:
        super().__init__(tau, seed=seed)
        self.norms = nn.ParameterList(nn.Parameter(torch.ones(64)) for _ in tau)
        self.drift = [torch.randn(64, generator=self.g) for _ in tau]

    @torch.no_grad()
    def move(self, lr: float) -> None:
        super().move(lr)
        for block, norm, drift in zip(self.blocks, self.norms, self.drift):
            block.bias.add_(lr * 0.05 * drift / drift.norm())
            norm.add_(lr * 0.05 * drift / drift.norm())


def test_learndrop_judges_weights_not_the_steady_drift_of_biases_and_normalisations():
    tau = [0.2, 0.2, 0.2, None, None]
    model = Normed(tau)
    segments = [
        names
        for s in range(len(tau))
        for names in ([f"blocks.{s}.weight", f"blocks.{s}.bias"], [f"norms.{s}"])
    ]
    policy = LearnDrop()
    state = policy.init_state(segments)
    policy.begin(state, model)
    lrs, decisions = cosine(30), []
    for e, lr in enumerate(lrs):
        model.move(lr)
        policy.observe(state, model, lr, 2.0 * math.exp(-e / 3))
        policy.plan(state, sum(lrs[e + 1 :]))
        decisions.append(policy.target(state, e + 1, len(lrs), -1)[0])
    assert state["weightless"] == [2 * s + 1 for s in range(len(tau))]
    assert max(decisions) in (
        2 * 2,
        2 * 2 + 1,
    )  # the settled blocks 0-2 drop, their drifting scales with them


def test_learndrop_holds_after_a_drop_that_hurt_until_validation_recovers():
    p = LearnDrop()
    state = p.init_state([["a"], ["b"], ["c"], ["d"]])
    state.update(observations=10, losses=[2.0, 0.5, 0.5])
    hurt = Drop(3, 30, 1, val_acc_before=0.80, val_acc_after=0.70, val_noise=0.01, hurt=True)
    p.epoch_end(state, Epoch(3, val_acc=0.70), hurt)
    assert p.target(state, 3, 10, 0)[1]["rule"].startswith("holding")
    p.epoch_end(state, Epoch(4, val_acc=0.79), None)  # not recovered yet
    assert state["hold"] == 0.80
    p.epoch_end(state, Epoch(5, val_acc=0.81), None)
    assert state["hold"] is None


def test_learndrop_checkpoints_no_copy_of_the_weights_and_resumes_to_the_same_decisions():
    lrs = cosine(20)
    straight = _run(LearnDrop(), Learner(tau=[0.3, 0.6, None, None, None]), lrs)
    policy, model = LearnDrop(), Learner(tau=[0.3, 0.6, None, None, None])
    state = policy.init_state(_segments(model))
    policy.begin(state, model)
    cut, resumed = -1, []
    for e, lr in enumerate(lrs):
        model.move(lr)
        policy.observe(state, model, lr, 2.0 * math.exp(-e / 3))
        if e == 7:  # a checkpoint: the snapshot is the model's weights, which the checkpoint holds
            saved = copy.deepcopy(policy.checkpoint_state(state, model))
            assert all(t is None for t in saved["snapshot"].values())
            state = policy.restore_state(saved, model)
        policy.plan(state, sum(lrs[e + 1 :]))
        cut = max(cut, policy.target(state, e + 1, len(lrs), cut)[0])
        resumed.append(cut)
    assert resumed == straight and max(straight) >= 0


def test_autofreeze_drops_the_front_segments_whose_gradient_norm_stopped_changing():
    p = AutoFreeze(window=1, warmup=2)
    state = p.init_state([[f"blocks.{s}.weight", f"blocks.{s}.bias"] for s in range(SEGMENTS)])
    model = Learner([None] * SEGMENTS)
    for t in range(6):
        for s, block in enumerate(model.blocks):
            for q in block.parameters():
                # segments 0-2: a steady gradient norm; 3-5: a norm that keeps changing
                q.grad = torch.full_like(q, 1.0 if s < 3 else float(1 + t * (s + 1)))
        p.observe(state, model)
    seg, why = p.target(state, 6, 10, -1)
    assert seg == 2, why


def test_freezeout_freezes_front_to_back_on_its_schedule_and_keeps_the_head():
    segments = [["a"], [], ["b"], ["c"], ["d"], ["e"]]
    p = FreezeOut(land=False)  # the schedule alone: its target follows the schedule
    state = p.init_state(segments)
    targets = [p.target(state, e, 10, -1)[0] for e in range(10)]
    assert targets == sorted(targets) and targets[0] == -1 and max(targets) <= 3
    annealed = FreezeOut()  # as published: each segment's landing ends at its freeze point
    ends = {s: end for s, (_, end) in annealed.landings(annealed.init_state(segments), 10, 100, 10).items()}
    assert sorted(ends) == [0, 2, 3] and ends[0] <= ends[2] <= ends[3] < 100  # front to back, head kept


@pytest.mark.parametrize(
    "text,kind",
    [
        ("learn-drop", LearnDrop),
        ("autofreeze", AutoFreeze),
        ("freezeout", FreezeOut),
        ("none", fxdrop.NoDrop),
        ("fixed:layer2@1", fxdrop.Fixed),
    ],
)
def test_policy_names_parse(text, kind):
    assert isinstance(fxdrop.policies.parse_policy(text), kind)


def test_a_learndrop_run_is_rebuilt_from_its_description():
    from fxdrop.policies import policy_from_description

    assert policy_from_description(LearnDrop(left=0.2).describe()) == LearnDrop(left=0.2)


def test_learndrop_freezes_deeper_segments_later_when_all_settle_alike():
    """Every segment learns the same slowing course: the threshold that falls with depth (a deeper
    cut costs more) drops them progressively, front first, where one threshold drops them at once."""

    def advances(policy):
        decisions = _run(policy, Learner(tau=[1.0] * 6, seed=2), cosine(30, lr=0.4))
        return sorted({(d, _first(decisions, d)) for d in decisions if d >= 0})

    graded, flat = advances(LearnDrop()), advances(LearnDrop(left_front=None))
    assert len(graded) > len(flat) >= 1
    assert [e for _, e in graded] == sorted(e for _, e in graded) and graded[0][1] < flat[-1][1]


def test_learndrop_judges_a_trained_front_sooner_and_still_not_on_a_decay_alone():
    """A fine-tune's front (`trained_front`) settles below `trained_left`: the same slowing course
    is dropped earlier than from scratch, segments that keep learning are still never dropped,
    and a learning-rate decay alone still freezes nothing."""
    trained = LearnDrop(trained_front=True)
    course = dict(tau=[2.0] * 6, seed=2)  # every segment slows alike
    unwaited = _first(_run(replace(trained, wait=0.0), Learner(**course), cosine(30, lr=0.4)), 0)
    scratch = _first(_run(LearnDrop(wait=0.0), Learner(**course), cosine(30, lr=0.4)), 0)
    assert unwaited is not None and scratch is not None and unwaited + 3 <= scratch
    # with the wait, the trained front drops as soon as the run's learning rate allows
    assert _first(_run(trained, Learner(**course), cosine(30, lr=0.4)), 0) == _waited(cosine(30, lr=0.4))
    assert set(_run(trained, Learner(tau=[None] * 5), cosine(30))) == {-1}
    decay = [0.1] * 10 + [0.01] * 10
    assert set(_run(trained, Learner(tau=[None] * 5), decay, told_left=lambda e: 2.0)) == {-1}


def test_finetune_judges_the_front_as_trained_only_when_it_loads_weights(tmp_path, monkeypatch):
    import fxdrop.finetuning as ft

    seen = []
    monkeypatch.setattr(ft, "fit_checked", lambda net, data, policy, *a, **k: seen.append(policy))
    monkeypatch.setattr(ft, "load_weights", lambda net, path: type("W", (), {"describe": lambda s: ""})())
    for weights in (None, "w.safetensors"):
        ft.finetune("timm:resnet18", "fashion-mnist", tmp_path / "run", weights=weights, limit=40, epochs=1)
    ft.finetune(
        "timm:resnet18",
        "fashion-mnist",
        tmp_path / "run",
        weights="w",
        policy=fxdrop.NoDrop(),
        limit=40,
        epochs=1,
    )
    assert [getattr(p, "trained_front", None) for p in seen] == [False, True, None]
