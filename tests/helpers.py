"""Shared test utilities: the Fashion-MNIST skip, the command runner, BatchNorm randomisation and
the exact-split / gradient checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxdrop

# where fxdrop looks for the Fashion-MNIST IDX files (FXDROP_DATA, else the Debian package's folder)
_FMNIST_DIR = Path(os.environ.get("FXDROP_DATA") or "/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = any(
    (_FMNIST_DIR / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Fashion-MNIST IDX files not in {_FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def tiny_model(num_classes: int = 4) -> nn.Module:
    """No BatchNorm and no dropout: a batch's gradient is the mean of its samples' gradients."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`fxdrop *args` in a fresh interpreter: 200 columns, one thread, no FXDROP_DEBUG traceback."""
    env = {k: v for k, v in os.environ.items() if k != "FXDROP_DEBUG"} | {
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "fxdrop_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


# a model file for `fxdrop finetune path.py:build`: three conv blocks, fast at 16 px
TINY_CNN = """
import torch.nn as nn

def build(num_classes=10):
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2), *block(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BatchNorm affine parameters and running statistics.

    timm zero-initialises the last BN of each residual block (and running stats start at 0/1),
    which would let an exactness check pass even if a branch were lost.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def randomize_zero_init(model: nn.Module, seed: int = 0) -> None:
    """Small random values in every parameter that is all zeros.

    torchvision's ViT zero-initialises its classifier, which makes every output 0 and any
    equality check trivial; other models zero-init residual gains and biases the same way.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def first(out):
    """The logits of a model output (torchvision's aux-head models return tuples in train mode)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def assert_exact_split(dg: fxdrop.DropGraph, cut, x: torch.Tensor) -> None:
    """In eval mode, fp32: suffix(prefix(x)) equals model(x) bit for bit."""
    model = dg.model
    prefix, suffix = dg.split(cut)
    model.eval()
    suffix.eval()
    with torch.no_grad():
        ref = model(x)
        a = prefix(x)
        a_before = a.clone()
        out = suffix(a)
    assert torch.equal(out, ref), f"cut {dg.cut_point(cut).name}: max diff {(out - ref).abs().max()}"
    assert torch.equal(a, a_before), f"cut {dg.cut_point(cut).name}: the suffix wrote to its input"


def assert_same_grads(dg: fxdrop.DropGraph, cut, x: torch.Tensor, seed: int = 0) -> None:
    """In train mode, the suffix's gradients equal the model's with its prefix modules in eval."""
    model = dg.model
    prefix, suffix = dg.split(cut)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train after the cut"

    model.train()
    for path in dg.prefix_modules(cut):
        model.get_submodule(path).training = False  # reason: not .eval(), which would recurse
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    first(model(x)).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in trainable if p.grad is not None}

    model.zero_grad(set_to_none=True)
    model.train()
    suffix.train()
    torch.manual_seed(seed)
    first(suffix(prefix(x))).square().mean().backward()
    got = {n: p.grad.clone() for n, p in trainable if p.grad is not None}
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.equal(got[n], ref[n]), f"grad of {n} differs: {(got[n] - ref[n]).abs().max()}"
    # reason: a frozen prefix never gets gradients
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def one_line(proc, *needles: str, code: int = 1) -> str:
    """The command exited with `code` and one line on stderr, no traceback, holding `needles`."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


class DropAfterObservations(fxdrop.policies.Policy):
    """Allows a drop to `cut` once it has been observed `n` times (within an epoch)."""

    interval = 0.25
    exact = True
    lands = False  # reason: drops the moment it says (a landing would move the drop later)

    def __init__(self, cut: int, n: int) -> None:
        self.cut, self.n = cut, n

    def init_state(self, segments):
        return {"seen": 0}

    def observe(self, state, model, lr=1.0, loss=None):
        state["seen"] += 1
        return {}

    def target(self, state, epoch, epochs, dropped):
        return (self.cut if state["seen"] >= self.n else -1), {}

    def describe(self):
        return {"name": "DropAfterObservations", "cut": self.cut, "n": self.n}
