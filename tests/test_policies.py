"""Drop policies on synthetic learning trajectories (no training): front to back, invariant to
the learning-rate schedule, nothing dropped while learning, warm-up and the head respected."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxdrop
from fxdrop.policies import AutoFreeze, FreezeOut, LearnDrop

SEGMENTS = 6  # segments with parameters, one Linear-sized block each


class Trajectory(nn.Module):
    """Parameters moved by hand: segment s learns (moves steadily in one direction) until its
    `settle[s]` observation, then only jitters: a random walk, a third as large per unit LR (as
    measured on ResNet-18 from scratch, docs/benchmarks.md)."""

    def __init__(self, settle: list[int], seed: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in settle)
        self.settle = settle
        self.g = torch.Generator().manual_seed(seed)
        self.direction = [torch.randn(32 * 32 + 32, generator=self.g) for _ in settle]

    def move(self, t: int, lr: float) -> None:
        for s, block in enumerate(self.blocks):
            flat = torch.cat([p.detach().reshape(-1) for p in block.parameters()])
            learning = t < self.settle[s]
            step = self.direction[s] if learning else torch.randn(flat.shape, generator=self.g)
            size = 0.05 if learning else 0.015
            flat += lr * size * step / step.norm() * flat.norm()
            torch.nn.utils.vector_to_parameters(flat, block.parameters())


def _segments(model: Trajectory) -> list[list[str]]:
    return [[f"blocks.{s}.weight", f"blocks.{s}.bias"] for s in range(len(model.blocks))]


def _decisions(policy, settle, lrs, loss=lambda t: 2.0 * math.exp(-t / 4)) -> list[int]:
    """The segment the policy would drop to after every observation."""
    model = Trajectory(settle)
    state = policy.init_state(_segments(model))
    out = []
    policy.observe(state, model, lrs[0], loss(0))
    for t, lr in enumerate(lrs):
        model.move(t, lr)
        policy.observe(state, model, lr, loss(t))
        out.append(policy.target(state, t, len(lrs), -1)[0])
    return out


CONSTANT = [0.1] * 24
COSINE = [0.1 * (t + 1) / 4 if t < 4 else 0.05 * (1 + math.cos(math.pi * (t - 4) / 20)) + 1e-4 for t in range(24)]


def test_learndrop_same_trajectory_same_decisions_under_constant_and_cosine_lr():
    settle = [3, 6, 9, 12, 24, 24]
    assert _decisions(LearnDrop(), settle, CONSTANT) == _decisions(LearnDrop(), settle, COSINE)


def test_learndrop_drops_front_to_back_as_segments_settle_and_never_a_learning_one():
    settle = [3, 6, 9, 12, 24, 24]
    decisions = _decisions(LearnDrop(), settle, COSINE)
    assert decisions == sorted(decisions)  # the cut only advances
    assert len(set(d for d in decisions if d >= 0)) >= 3  # progressively, in several steps
    for t, d in enumerate(decisions):
        assert all(settle[s] <= t for s in range(d + 1))  # nothing dropped while it still learns
    assert max(decisions) <= SEGMENTS - 1 - LearnDrop().min_trainable  # the head always trains


def test_learndrop_drops_in_steps_of_at_most_its_advance_share_and_lets_each_settle():
    settle = [2] * SEGMENTS  # everything settles at once: the jump the cap must break up
    policy = LearnDrop(advance=0.4, hold=3, min_trainable=1)
    model = Trajectory(settle)
    state = policy.init_state(_segments(model))
    policy.observe(state, model, 0.1, 2.0)
    cut, drops = -1, []
    for t in range(30):
        model.move(t, 0.1)
        policy.observe(state, model, 0.1, 2.0 * math.exp(-t / 4))
        seg = policy.target(state, t, 30, cut)[0]
        if seg > cut:  # the engine applies it
            drops.append((t, seg))
            cut = seg
    assert [seg for _, seg in drops] == [1, 3, 4]  # two segments at a time, up to the head
    assert all(b[0] - a[0] >= 3 for a, b in zip(drops, drops[1:]))  # `hold` observations apart


@pytest.mark.parametrize("depth", [6, 12, 30])
def test_learndrop_crosses_a_network_in_the_same_number_of_advances_whatever_its_depth(depth):
    """`advance` is a share of the droppable segments: a deep network (ResNet-50 has 3x the
    segments of ResNet-18) is not held to a few blocks per epoch."""
    policy = LearnDrop(hold=1, min_trainable=1)
    model = Trajectory([2] * depth)
    state = policy.init_state(_segments(model))
    policy.observe(state, model, 0.1, 2.0)
    allowed = [-1]
    for t in range(40):
        model.move(t, 0.1)
        policy.observe(state, model, 0.1, 2.0 * math.exp(-t / 4))
        seg = policy.target(state, t, 40, -1)[0]
        if seg > allowed[-1]:
            allowed.append(seg)
    assert allowed[-1] == depth - 2 and len(allowed) - 1 == 3


def test_learndrop_allowance_advances_while_the_engine_declines_its_drops():
    """The step costs may refuse an allowed drop (an early segment is cheap to train); the policy's
    allowance still advances in steps, so the cut can go where dropping pays once it is allowed."""
    settle = [2] * SEGMENTS
    policy = LearnDrop(advance=0.4, hold=3, min_trainable=1)
    model = Trajectory(settle)
    state = policy.init_state(_segments(model))
    policy.observe(state, model, 0.1, 2.0)
    allowed = []
    for t in range(30):
        model.move(t, 0.1)
        policy.observe(state, model, 0.1, 2.0 * math.exp(-t / 4))
        seg = policy.target(state, t, 30, -1)[0]  # the engine declines: nothing is ever dropped
        if seg > (allowed[-1][1] if allowed else -1):
            allowed.append((t, seg))
    assert [seg for _, seg in allowed] == [1, 3, 4]
    assert all(b[0] - a[0] >= 3 for a, b in zip(allowed, allowed[1:]))


class Normed(Trajectory):
    """A Trajectory whose every block is followed by a normalisation segment of its own (a 1-D
    scale), and whose biases and scales drift steadily in one direction all run, as a BatchNorm's
    affine parameters follow its batch statistics (VGG-11-BN, docs/benchmarks.md)."""

    def __init__(self, settle: list[int], seed: int = 0) -> None:
        super().__init__(settle, seed)
        self.norms = nn.ParameterList(nn.Parameter(torch.ones(32)) for _ in settle)
        self.drift = [torch.randn(32, generator=self.g) for _ in settle]

    def move(self, t: int, lr: float) -> None:
        super().move(t, lr)
        with torch.no_grad():
            for block, norm, drift in zip(self.blocks, self.norms, self.drift):
                block.bias.add_(lr * 0.05 * drift / drift.norm())
                norm.add_(lr * 0.05 * drift / drift.norm())


def test_learndrop_judges_weights_not_the_steady_drift_of_biases_and_normalisations():
    settle = [3, 6, 9, 12, 24, 24]
    model = Normed(settle)
    segments = [names for s in range(len(settle)) for names in ([f"blocks.{s}.weight", f"blocks.{s}.bias"], [f"norms.{s}"])]
    policy = LearnDrop()
    state = policy.init_state(segments)
    policy.observe(state, model, COSINE[0], 2.0)
    decisions = []
    for t, lr in enumerate(COSINE):
        model.move(t, lr)
        policy.observe(state, model, lr, 2.0 * math.exp(-t / 4))
        decisions.append(policy.target(state, t, len(COSINE), -1)[0])
    assert state["weightless"] == [2 * s + 1 for s in range(len(settle))]
    assert max(decisions) >= 2 * 3  # the settled blocks 0-3 drop, their drifting scales with them
    for t, d in enumerate(decisions):
        assert all(settle[s] <= t for s in range(d // 2 + 1))  # never a block that still learns


def test_learndrop_resumes_from_a_state_whose_snapshots_include_biases():
    """A run checkpointed before LearnDrop judged weights only carries snapshots with the biases:
    the first observation after the resume starts the series again instead of failing."""
    model, policy = Trajectory([2] * SEGMENTS), LearnDrop()
    state = policy.init_state(_segments(model))
    for t in range(4):
        model.move(t, 0.1)
        policy.observe(state, model, 0.1, 1.0)
    state["snapshot"] = {s: torch.cat([v, torch.zeros(32)]) for s, v in state["snapshot"].items()}
    state["deltas"] = [{s: torch.cat([d, torch.zeros(32)]) for s, d in deltas.items()} for deltas in state["deltas"]]
    before = len(state["cos"][0])
    for t in range(4, 8):
        model.move(t, 0.1)
        policy.observe(state, model, 0.1, 1.0)
    assert len(state["cos"][0]) > before


def test_learndrop_drops_nothing_while_everything_learns():
    assert set(_decisions(LearnDrop(), [99] * SEGMENTS, COSINE)) == {-1}


def test_learndrop_waits_for_warmup_and_for_the_network_to_learn():
    settle = [0] * SEGMENTS  # noise from the start: nothing was ever learned
    flat_loss = _decisions(LearnDrop(), settle, CONSTANT, loss=lambda t: 2.3)
    assert set(flat_loss) == {-1}
    decisions = _decisions(LearnDrop(warmup=6), [3, 3, 99, 99, 99, 99], CONSTANT)
    assert set(decisions[:5]) == {-1} and max(decisions) >= 0


def test_learndrop_holds_after_a_drop_that_hurt_until_validation_recovers():
    p = LearnDrop()
    state = p.init_state([["a"], ["b"], ["c"], ["d"]])
    state.update(observations=10, losses=[2.0, 0.5, 0.5])
    p.epoch_end(state, {"val_acc": 0.70}, {"hurt": True, "val_acc_before": 0.80})
    assert p.target(state, 3, 10, 0)[1]["rule"].startswith("holding")
    p.epoch_end(state, {"val_acc": 0.81}, None)
    assert state["hold"] is None


def test_autofreeze_drops_the_front_segments_whose_gradient_norm_stopped_changing():
    p = AutoFreeze(window=1, warmup=2)
    state = p.init_state([[f"blocks.{s}.weight", f"blocks.{s}.bias"] for s in range(SEGMENTS)])
    model = Trajectory([0] * SEGMENTS)
    for t in range(6):
        for s, block in enumerate(model.blocks):
            for q in block.parameters():
                # segments 0-2: a steady gradient norm; 3-5: a norm that keeps changing
                q.grad = torch.full_like(q, 1.0 if s < 3 else float(1 + t * (s + 1)))
        p.observe(state, model)
    seg, why = p.target(state, 6, 10, -1)
    assert seg == 2, why


def test_freezeout_freezes_front_to_back_on_its_schedule_and_keeps_the_head():
    p = FreezeOut()
    state = p.init_state([["a"], [], ["b"], ["c"], ["d"], ["e"]])
    targets = [p.target(state, e, 10, -1)[0] for e in range(10)]
    assert targets == sorted(targets) and targets[0] == -1 and max(targets) <= 3


@pytest.mark.parametrize("text,kind", [("learn-drop", LearnDrop), ("autofreeze", AutoFreeze), ("freezeout", FreezeOut),
                                       ("none", fxdrop.NoDrop), ("fixed:layer2@1", fxdrop.Fixed)])
def test_policy_names_parse(text, kind):
    assert isinstance(fxdrop.policies.parse_policy(text), kind)


def test_a_learndrop_run_described_before_advance_replaced_max_advance_is_rebuilt():
    from fxdrop.policies import policy_from_description

    described = LearnDrop().describe()
    described.pop("advance")
    described["max_advance"] = 3  # config.json of a run made by the previous version
    assert policy_from_description(described) == LearnDrop()
