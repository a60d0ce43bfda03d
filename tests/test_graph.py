"""Graph core on toy modules: cut points, exact splits, gradients, errors, state restoration."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_exact_split, assert_same_grads, randomize_bn
from timm.layers import DropPath
from torch import nn

import fxdrop


def conv_bn(cin: int, cout: int, inplace: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=inplace)]


class Residual(nn.Module):
    """Functional residual: x + f(x), with the add at this module's top level."""

    def __init__(self, c: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c, c), nn.Conv2d(c, c, 3, padding=1))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        return F.relu(x + self.drop_path(self.body(x)))


class ResNetToy(nn.Module):
    def __init__(self, drop_path: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8))
        self.block1 = Residual(8, drop_path)
        self.block2 = Residual(8, drop_path)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.drop(x.mean((2, 3))))


class DenseToy(nn.Module):
    """torch.cat skip connections, as in DenseNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.f1 = nn.Sequential(*conv_bn(4, 4))
        self.f2 = nn.Sequential(*conv_bn(8, 4))
        self.trans = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.f1(x)], 1)
        x = torch.cat([x, self.f2(x)], 1)
        return self.fc(self.trans(x).flatten(2).mean(-1))


class TiedToy(nn.Module):
    """The first and the last layer share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6, bias=False)
        self.mid1 = nn.Linear(6, 6)
        self.mid2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.tanh(self.enc(x))
        x = torch.tanh(self.mid1(x))
        x = F.linear(x, self.enc.weight)  # tied to enc
        x = torch.tanh(self.mid2(x))
        return self.head(x)


class InplaceToy(nn.Module):
    """In-place ops right after a cut, one of them with an unused result (fx DCE would drop it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.conv2(x)
        x.mul_(2.0)  # result unused: only the side effect matters
        return self.fc(F.relu_(x).mean((2, 3)))


class ControlFlowToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.gate(x).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace this
            return x
        return -x


class OptionalArgToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x, mask: torch.Tensor | None = None, scale: float = 1.0):
        x = torch.relu(self.a(x))
        if mask is not None:
            x = x * mask
        x = torch.relu(self.b(x)) * scale
        if mask is not None:
            x = x * mask
        return self.c(x)


def _img(b: int = 2, s: int = 8) -> torch.Tensor:
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _check_all(model: nn.Module, x: torch.Tensor) -> fxdrop.DropGraph:
    randomize_bn(model)
    dg = fxdrop.trace(model, x)
    assert dg.cut_points
    for cp in dg.cut_points:
        assert_exact_split(dg, cp, x)
        assert_same_grads(dg, cp, x)
    return dg


def test_sequential_every_layer_is_a_cut():
    model = nn.Sequential(
        *conv_bn(3, 4), *conv_bn(4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    dg = _check_all(model, _img())
    assert [cp.module for cp in dg.cut_points] == [str(i) for i in range(8)]
    assert len(dg.segments) == len(dg.cut_points) + 1


def test_functional_residual_cuts_only_between_blocks():
    dg = _check_all(ResNetToy(), _img())
    modules = [cp.module for cp in dg.cut_points]
    assert "block1" in modules and "block2" in modules
    # reason: inside a block the input is still live for the skip connection
    assert not any(m.startswith("block1.body") for m in modules)


def test_cat_skips_have_no_cut_inside():
    dg = _check_all(DenseToy(), _img())
    # the stem output is live until both concatenations have run: no cut between stem and trans
    assert [cp.module for cp in dg.cut_points][0] == "stem"
    assert not any(m.startswith(("f1", "f2")) for m in (cp.module for cp in dg.cut_points))


def test_tied_weights_block_cuts_between_their_uses():
    model = TiedToy()
    dg = _check_all(model, torch.randn(4, 6))
    enc = model.enc.weight
    seg = dg.segment_of()
    # enc and mid1 are in the same segment: no cut separates the two uses of enc.weight
    assert seg["enc.weight"] == seg["mid1.weight"]
    for cp in dg.cut_points:
        prefix, _ = dg.split(cp)
        assert enc.requires_grad or cp.index >= seg["enc.weight"]


def test_every_parameter_is_in_exactly_one_segment():
    model = timm.create_model("resnet18", num_classes=4)
    dg = fxdrop.trace(model, _img(2, 32))
    names = [n for s in dg.segments for n in s.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_inplace_ops_after_the_cut_do_not_corrupt_the_input():
    dg = _check_all(InplaceToy(), _img())  # assert_exact_split checks the input is unchanged
    cut_after_conv2 = dg.cut_point("conv2")
    prefix, suffix = dg.split(cut_after_conv2)
    a = prefix(_img())
    kept = a.clone()
    suffix(a)  # first call: detects the in-place mul_ on its input
    suffix(a)  # later calls keep copying
    assert torch.equal(a, kept)


def test_dropout_and_drop_path_train_behaviour_is_kept():
    model = ResNetToy(drop_path=0.5, dropout=0.5)
    x = _img()
    dg = _check_all(model, x)  # gradients equal the model's under the same seed
    prefix, suffix = dg.split("block1")
    suffix.train()
    torch.manual_seed(0)
    train_out = suffix(prefix(x))
    suffix.eval()
    eval_out = suffix(prefix(x))
    assert not torch.equal(train_out, eval_out), "the suffix lost dropout / drop-path in train mode"


def test_drop_path_graphs_differ_but_cuts_match():
    model = timm.create_model("resnet18", num_classes=3, drop_path_rate=0.2)
    x = _img(2, 32)
    dg = fxdrop.trace(model, x)
    train_ops = {str(n.target) for n in dg.train_graph.graph.nodes}
    eval_ops = {str(n.target) for n in dg.eval_graph.graph.nodes}
    assert train_ops != eval_ops  # drop_path only exists in the train graph
    for cp in dg.cut_points[::4]:
        assert_exact_split(dg, cp, x)
        assert_same_grads(dg, cp, x)


def test_timm_resnet_exact_with_random_bn():
    model = timm.create_model("resnet18", num_classes=4)
    randomize_bn(model)
    x = _img(2, 32)
    dg = fxdrop.trace(model, x)
    for cp in dg.cut_points:
        assert_exact_split(dg, cp, x)
    assert_same_grads(dg, "layer2", x)


def test_data_dependent_control_flow_is_a_clear_error():
    with pytest.raises(fxdrop.UntraceableModelError, match=r"'gate'.*leaf_modules"):
        fxdrop.trace(ControlFlowToy(), _img())


def test_user_leaf_module_makes_it_traceable():
    model = ControlFlowToy()
    dg = fxdrop.trace(model, _img(), leaf_modules=["gate"])
    assert [cp.module for cp in dg.cut_points][0] == "gate"
    assert_exact_split(dg, 0, _img())


def test_optional_forward_arguments_are_fixed_to_defaults():
    dg = _check_all(OptionalArgToy(), torch.randn(3, 4))
    assert {"a", "b"} <= {cp.module for cp in dg.cut_points}
    assert sum(n.op == "placeholder" for n in dg.eval_graph.graph.nodes) == 1


def test_trace_restores_modes_and_requires_grad():
    model = ResNetToy()
    model.train()
    model.block1.eval()
    model.stem[0].weight.requires_grad_(False)
    before = [(m.training) for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    fxdrop.trace(model, _img())
    assert [m.training for m in model.modules()] == before
    assert [p.requires_grad for p in model.parameters()] == flags


def test_split_shares_parameters_and_freezes_only_the_prefix():
    model = ResNetToy()
    dg = fxdrop.trace(model, _img())
    prefix, suffix = dg.split("block1")
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in suffix.parameters()} <= model_params
    assert all(not p.requires_grad for p in prefix.parameters())
    assert all(p.requires_grad for p in suffix.parameters())
    # splitting earlier gives the suffix its parameters back
    _, suffix0 = dg.split(0)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("stem.0"))
    # the frozen prefix stays in eval mode even when the whole model is put in train mode
    model.train()
    prefix.train()
    assert not prefix.training
    x = _img()
    out1 = prefix(x)
    assert not any(m.training for m in prefix.eval_gm.modules() if m is not prefix.eval_gm)
    assert torch.equal(out1, prefix(x))


def test_cut_point_fields_and_flops():
    model = timm.create_model("resnet18", num_classes=4)
    dg = fxdrop.trace(model, _img(2, 32))
    total = sum(p.numel() for p in model.parameters())
    prev = -1
    for cp in dg.cut_points:
        assert cp.prefix_flops + cp.suffix_flops == dg.total_flops
        assert cp.prefix_flops >= prev
        prev = cp.prefix_flops
        assert cp.prefix_params + cp.suffix_params == total
        n = 1
        for d in cp.shape:
            n *= d
        assert cp.bytes_per_sample == 4 * n
    json.dumps([cp.to_dict() for cp in dg.cut_points])
    # FlopCounterMode's count of the whole model, per sample
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(_img(2, 32))
    assert dg.total_flops == counter.get_total_flops() // 2


def test_cut_resolution_and_errors():
    dg = fxdrop.trace(ResNetToy(), _img())
    cp = dg.cut_points[1]
    assert dg.cut_point(1) is cp
    assert dg.cut_point(cp.name) is cp
    assert dg.cut_point(cp) is cp
    with pytest.raises(fxdrop.CutPointError, match="out of range"):
        dg.cut_point(99)
    with pytest.raises(fxdrop.CutPointError, match="no cut point named 'nope'"):
        dg.cut_point("nope")


def test_between_maps_one_cut_to_a_later_one():
    model = ResNetToy()
    randomize_bn(model)
    x = _img()
    dg = fxdrop.trace(model, x)
    p1, _ = dg.split("stem")
    p2, _ = dg.split("block2")
    mid = dg.between("stem", "block2")
    with torch.no_grad():
        assert torch.equal(mid(p1(x)), p2(x))
