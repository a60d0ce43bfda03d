"""Measurements the step costs are made of, taken on this machine: every segment's forward and
backward on a real batch, the read bandwidth of each cache tier, the write rate of shards."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import torch

from .._state import preserve_modes
from ..graph import DropGraph

__all__ = ["segment_seconds", "measure_bandwidth", "measure_write_rate"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def segment_seconds(
    dg: DropGraph, x: torch.Tensor, amp: bool = False, rounds: int = 1
) -> tuple[list[float], list[float]]:
    """Seconds of every segment on batch `x` (B, C, H, W): its forward, and its forward and
    backward (parameter and input gradients) as a training step runs it; the fastest of `rounds`
    after a warm-up, from one pass per round. The backward is measured, not assumed to cost twice
    the forward: on a CPU, convolutions on small feature maps take several times their forward to
    differentiate. Runs the eval graph's pieces: no BatchNorm statistic, RNG, weight, gradient or
    mode changes."""
    params = dict(dg.model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    forward, train = [float("inf")] * len(dg.segments), [float("inf")] * len(dg.segments)
    try:
        # a frozen piece puts the modules it shares with the model in eval mode when it is
        # built, so the pieces are built inside the block that restores every module's mode
        with preserve_modes(dg.model):
            pieces = [
                dg.between(a, b) for a, b in zip(range(len(dg.cut_points) - 1), range(1, len(dg.cut_points)))
            ]
            first, _ = dg.split(0)
            _, last = dg.split(len(dg.cut_points) - 1)
            pieces = [first, *pieces, last.eval()]
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None  # a backward accumulates into an existing gradient in place
            for r in range(rounds + 1):
                h = x
                for i, piece in enumerate(pieces):
                    inp = h.detach().requires_grad_(i > 0)  # the images need no gradient
                    with torch.enable_grad():
                        t_forward, out = _timed(lambda: _first(piece, inp, amp), x.device)
                        t_backward, _ = _timed(lambda: out.float().sum().backward(), x.device)
                    h = out.detach()
                    if r:
                        forward[i] = min(forward[i], t_forward)
                        train[i] = min(train[i], t_forward + t_backward)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])  # split() froze the prefix of its cut
            p.grad = grads[n]
    return forward, train


def _first(piece: torch.nn.Module, h: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.autocast(h.device.type, torch.bfloat16, enabled=amp):
        out = piece(h)
    return out[0] if isinstance(out, (tuple, list)) else out


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def measure_bandwidth(
    tier: str, device: torch.device, nbytes: int = 32 * 2**20, folder: str | None = None
) -> float:
    """Bytes per second of gathering a batch from the tier onto `device`."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32).uniform_(generator=torch.Generator().manual_seed(0))
    rows = src.view(-1, 1024)
    sel = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[: rows.shape[0] // 2]
    if tier == "device" and device.type == "cuda":
        rows, sel = rows.to(device), sel.to(device)
    elif tier == "pinned" and device.type == "cuda":
        rows = rows.pin_memory()
    if tier == "disk":
        with tempfile.NamedTemporaryFile(dir=folder, delete=True) as f:
            f.write(src.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                # evict the file from the page cache so the read comes from the disk
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            with open(f.name, "rb", buffering=0) as g:
                data = g.read()
            return len(data) / max(time.perf_counter() - t0, 1e-9)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        out = rows.index_select(0, sel)
        if out.device != device:
            out = out.to(device, non_blocking=True)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return out.numel() * 4 / best


def measure_write_rate(folder: str | None = None, nbytes: int = 16 * 2**20) -> float:
    """Bytes per second of writing cache shards here: serialise, hash, write and fsync, as the
    cache writer does."""
    import hashlib

    from safetensors.torch import save

    x = torch.empty(nbytes // 4, dtype=torch.float32).uniform_(generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    payload = save({"x": x})
    hashlib.sha256(payload).hexdigest()
    with tempfile.NamedTemporaryFile(dir=folder, delete=True) as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return len(payload) / max(time.perf_counter() - t0, 1e-9)
