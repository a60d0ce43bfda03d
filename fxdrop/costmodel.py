"""Cost model: predicted training-step time at each cut, from throughput and bandwidth measured
on this machine at start-up (never assumed).

    step(cut) = fixed + 3 * suffix_flops(cut) * batch / flops_per_s + bytes(cut) * batch / read_bytes_per_s

`3 *`: a training step is one forward and a backward of about twice its FLOPs. `fixed` is the
per-step cost that does not scale with FLOPs (optimizer, kernel launches, Python); both are fitted
from timed steps of the whole model and of the smallest suffix.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .graph import CutPoint, DropGraph, trace

__all__ = ["CostModel", "measure_cost", "measure_bandwidth", "host_available_bytes"]


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class CostModel:
    device: str
    fixed_s: float  # per-step time that does not scale with FLOPs
    flops_per_s: float  # training FLOPs (forward x 3) per second
    read_bytes_per_s: float  # cache tier bandwidth (gather + copy to the device)
    tier: str  # the tier the bandwidth was measured for
    batch_size: int
    total_flops: int  # forward FLOPs per sample of the whole model

    def step_seconds(self, cut: CutPoint | None, cached: bool = True) -> float:
        """Predicted step time with the cut at `cut` (None: the whole model from images)."""
        if cut is None:
            return self.fixed_s + 3 * self.total_flops * self.batch_size / self.flops_per_s
        compute = 3 * cut.suffix_flops * self.batch_size / self.flops_per_s
        if not cached:  # freeze-only: the prefix still runs forward
            compute += cut.prefix_flops * self.batch_size / self.flops_per_s
        move = cut.bytes_per_sample * self.batch_size / self.read_bytes_per_s if cached else 0.0
        return self.fixed_s + compute + move

    def build_seconds(self, frm: CutPoint | None, to: CutPoint, samples: int) -> float:
        """Predicted time to build the cache at `to`: the segments between the cuts run forward
        once over `samples` (from the images when `frm` is None, else from the cache at `frm`)."""
        flops = to.prefix_flops - (frm.prefix_flops if frm is not None else 0)
        return flops * samples / self.flops_per_s

    def ideal_seconds(self, cut: CutPoint) -> float:
        """The suffix step with its activations already on the device."""
        return self.fixed_s + 3 * cut.suffix_flops * self.batch_size / self.flops_per_s

    def to_dict(self) -> dict:
        return asdict(self)


def _time_steps(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median seconds of a training step (forward, backward, SGD) after one warm-up step."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9) if params else None
    times = []
    for i in range(steps + 1):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = module(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = F.cross_entropy(out.float(), y)
        if params:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(tier: str, device: torch.device, nbytes: int = 64 * 2**20, folder: str | None = None) -> float:
    """Bytes per second of gathering a batch from the tier onto `device`."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32).uniform_()
    rows = src.view(-1, 1024)
    sel = torch.randperm(rows.shape[0])[: rows.shape[0] // 2]
    if tier == "device" and device.type == "cuda":
        rows = rows.to(device)
        sel = sel.to(device)
    elif tier == "pinned" and device.type == "cuda":
        rows = rows.pin_memory()
    if tier == "disk":
        with tempfile.NamedTemporaryFile(dir=folder, delete=True) as f:
            f.write(src.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                # reason: evict the file from the page cache so the read comes from the disk
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            with open(f.name, "rb", buffering=0) as g:
                data = g.read()
            t = time.perf_counter() - t0
        return len(data) / max(t, 1e-9)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = rows.index_select(0, sel)
        if out.device != device:
            out = out.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return out.numel() * 4 / best


def measure_cost(dg: DropGraph, batch_size: int, device: torch.device, tier: str = "memory",
                 folder: str | None = None, steps: int = 2) -> CostModel:
    """Time training steps of a copy of the model (the user's model is untouched) and the tier's
    bandwidth on this machine. Steps run at a batch of at most 16 and are scaled to `batch_size`."""
    model = copy.deepcopy(dg.model).to(device)
    b = max(2, min(batch_size, 16))
    x = dg.example_input[:1].to(device).expand(b, *dg.example_input.shape[1:]).contiguous()
    x = x + 0.01 * torch.randn_like(x)  # (B, C, H, W); distinct samples so BatchNorm can train
    y = torch.zeros(b, dtype=torch.long, device=device)
    copy_dg = trace(model, x)
    model.train()
    t_full = _time_steps(model, x, y, steps)
    last = copy_dg.cut_points[-1]
    prefix, suffix = copy_dg.split(last)
    with torch.no_grad():
        a = prefix(x)
    suffix.train()
    t_small = _time_steps(suffix, a, y, steps)
    flops_full = 3 * dg.total_flops * b
    flops_small = 3 * last.suffix_flops * b
    rate = max(flops_full - flops_small, 1) / max(t_full - t_small, 1e-6)
    fixed = max(t_small - flops_small / rate, 0.0)
    bandwidth = measure_bandwidth(tier, device, folder=folder)
    return CostModel(str(device), fixed, rate, bandwidth, tier, batch_size, dg.total_flops)
