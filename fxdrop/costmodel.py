"""Cost model: the time of a training step at each cut and of building a cache there, measured
on this machine (never assumed).

Two views of the same measurements:
  DropCost   what the training loop decides with: training steps timed at the candidate cuts on a
             private copy of the model, plus moving the cached activations at the measured
             bandwidth of their tier; building a cache is calibrated on the builds already done.
  CostModel  a fit over every cut at once, for `fxdrop inspect --cost`:
             step(cut) = fixed + 3 * suffix_flops(cut) * batch / flops_per_s + bytes(cut) * batch / read_bytes_per_s
             `3 *`: a training step is one forward and a backward of about twice its FLOPs; `fixed`
             and `flops_per_s` come from timed steps of the whole model and of the smallest suffix.
             Late layers on small feature maps run fewer FLOP/s than early ones, so this fit is a
             guide; the loop times the cuts it may take.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .graph import CutPoint, DropGraph

__all__ = ["CostModel", "DropCost", "StepTimer", "measure_cost", "measure_bandwidth", "host_available_bytes"]


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

    def ideal_seconds(self, cut: CutPoint) -> float:
        """The suffix step with its activations already on the device."""
        return self.fixed_s + 3 * cut.suffix_flops * self.batch_size / self.flops_per_s

    def to_dict(self) -> dict:
        return asdict(self)


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


class StepTimer:
    """Times training steps at any cut on a private copy of the model, so the user's model
    (weights, modes, BatchNorm statistics, `requires_grad`) is never touched.

    The copy lives on the host between measurements and visits `device` only while timed. Every
    measurement is remembered until the same cut is timed again. Steps replay the training loop's:
    bf16 autocast when `amp`, channels-last when `channels_last`, the run's optimizer.

    Args:
        dg: the traced model.
        batch_size: the batch a training step takes (per rank).
        device: where training runs.
        amp, channels_last: as the training loop runs.
        make_optimizer: builds the run's optimizer for a parameter list (default: SGD with momentum).
        steps: timed steps per measurement (the fastest counts), after one warm-up step; None: 3
            on CUDA (cheap steps, noisier clocks), 2 on CPU (slow steps, steady after the warm-up).
    """

    def __init__(self, dg: DropGraph, batch_size: int, device: torch.device, amp: bool = False,
                 channels_last: bool = False, steps: int | None = None,
                 make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None) -> None:
        self.dg = copy.deepcopy(dg)
        self.dg.model.to("cpu")
        self.batch_size, self.device, self.amp, self.channels_last = batch_size, device, amp, channels_last
        self.steps = steps if steps is not None else (3 if device.type == "cuda" else 2)
        self.make_optimizer = make_optimizer or (lambda params: torch.optim.SGD(params, lr=1e-6, momentum=0.9))
        self.train_s: dict[int, float] = {}  # cut -> seconds of a training step (-1: the whole model)

    def _input(self, batch: int) -> torch.Tensor:
        ex = self.dg.example_input
        x = ex[:1].to(self.device).expand(batch, *ex.shape[1:]).contiguous()  # (B, C, H, W)
        # reason: distinct samples, so BatchNorm's batch statistics are not degenerate
        return x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _prepare(self, cut: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        """A training step of the suffix at `cut` (-1: the whole model), and the parameters it trains."""
        if cut < 0:
            module = model
            for name, p in model.named_parameters():
                p.requires_grad_(self.dg._requires_grad[name])  # reason: undo an earlier split's freezing
        else:
            prefix, module = self.dg.split(cut)
            with torch.no_grad():
                x = prefix(x)
        x = self._layout(x).detach()
        params = [p for p in module.parameters() if p.requires_grad]
        opt = self.make_optimizer(params) if params else None
        module.train()

        def step() -> None:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
                out = module(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = F.cross_entropy(out.float(), y)
            if opt is not None:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step, params

    def time_cuts(self, cuts: list[int]) -> dict[int, float]:
        """Time a training step at each of `cuts` afresh, interleaved: round after round, one step
        per cut, so a drift of the machine's speed (other load, clocks) affects every cut alike.
        Keeps the fastest of `steps` rounds after a warm-up round (noise only adds time)."""
        model = self.dg.model.to(self.device)
        try:
            x = self._input(self.batch_size)
            y = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
            # reason: the pieces share the copy's parameters; each step trains only its own
            prepared = {cut: self._prepare(cut, model, x, y) for cut in cuts}
            every = list(model.parameters())
            best = dict.fromkeys(cuts, float("inf"))
            for i in range(self.steps + 1):
                for cut, (step, params) in prepared.items():
                    for p in every:
                        p.requires_grad_(False)
                    for p in params:
                        p.requires_grad_(True)
                    _sync(self.device)
                    t0 = time.perf_counter()
                    step()
                    _sync(self.device)
                    if i:
                        best[cut] = min(best[cut], time.perf_counter() - t0)
        finally:
            model.to("cpu")
        self.train_s.update(best)
        return best

    def step_seconds(self, cut: int) -> float:
        """Seconds of one training step of the suffix at `cut` (-1: the whole model), timed once."""
        if cut not in self.train_s:
            self.time_cuts([cut])
        return self.train_s[cut]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DropCost:
    """What a drop costs and saves, from training steps timed at the candidate cuts on this machine.

        step(cut)   = training step of the suffix at `cut` (timed) + getting its input:
                      cut = -1: the image pipeline (measured in the last epoch, per step);
                      cut >= 0: the cached activations, bytes(cut) * batch / bandwidth(tier(cut))
        build(frm -> to) = samples * (loading an image when frm = -1
                                      + forward of cuts (frm, to]: (step(frm) - step(to)) / 3 per batch)
                           * build_factor

    A forward is a third of its training step (the backward costs about twice the forward), so
    the timed steps give the build's forward too. `build_factor` starts at 1 and becomes measured
    / predicted after each build, so later estimates include writing and hashing the shards.

    Args:
        dg: the traced model.
        timer: times steps at any cut on a copy of the model.
        bandwidth: bytes per second of the tier a cache at `cut` would live in (measured).
    """

    dg: DropGraph
    timer: StepTimer
    bandwidth: Callable[[int], float]
    cache_itemsize: int = 4  # bytes per cached element (2 for a bf16 cache)
    image_step_s: float = 0.0  # waiting for a batch of images, per step (measured while training)
    observed_step_s: float = 0.0  # the last epoch's mean training step at the current cut (0: none yet)
    build_factor: float = 1.0  # measured / predicted time of the last cache build
    declined: dict[tuple[int, int], int] = field(default_factory=dict)  # (cut, deepest candidate) -> steps left when declined

    def cut_timing_seconds(self) -> float:
        """About what timing one cut costs now: warm-up + steps, each at most as long as the
        current step."""
        return (1 + self.timer.steps) * self.observed_step_s

    def step_seconds(self, cut: int) -> float:
        compute = self.timer.step_seconds(cut)
        if cut < 0:
            return compute + self.image_step_s
        # reason: bytes_per_sample is measured in fp32
        nbytes = self.dg.cut_points[cut].bytes_per_sample * self.cache_itemsize // 4
        return compute + nbytes * self.timer.batch_size / self.bandwidth(cut)

    def build_seconds(self, frm: int, to: int, samples: int) -> float:
        forward = max(self.timer.step_seconds(frm) - self.timer.step_seconds(to), 0.0) / 3
        load = self.image_step_s if frm < 0 else 0.0
        return samples * (load + forward) / self.timer.batch_size * self.build_factor

    def built(self, frm: int, to: int, samples: int, seconds: float) -> None:
        """Calibrate build estimates with a build that took `seconds`."""
        self.build_factor = 1.0
        predicted = self.build_seconds(frm, to, samples)
        if predicted > 0:  # reason: a zero estimate (timing noise) says nothing about the scale
            self.build_factor = seconds / predicted

    def ideal_seconds(self, cut: int) -> float:
        """The suffix step with its activations already on the device."""
        return self.timer.step_seconds(cut)

    def to_dict(self) -> dict:
        """The measurements so far (metrics.json)."""
        return {
            "device": str(self.timer.device), "batch_size": self.timer.batch_size,
            "image_step_s": round(self.image_step_s, 6), "observed_step_s": round(self.observed_step_s, 6),
            "build_factor": round(self.build_factor, 3),
            "train_step_s": {str(k): round(v, 6) for k, v in sorted(self.timer.train_s.items())},
        }


def measure_cost(dg: DropGraph, batch_size: int, device: torch.device, tier: str = "memory",
                 folder: str | None = None, steps: int = 2) -> CostModel:
    """Time training steps of a copy of the model (the user's model is untouched) and the tier's
    bandwidth on this machine. Steps run at a batch of at most 16 and are scaled to `batch_size`."""
    b = max(2, min(batch_size, 16))
    timer = StepTimer(dg, b, device, steps=steps)
    last = dg.cut_points[-1]
    t_full, t_small = timer.step_seconds(-1), timer.step_seconds(last.index)
    flops_full = 3 * dg.total_flops * b
    flops_small = 3 * last.suffix_flops * b
    rate = max(flops_full - flops_small, 1) / max(t_full - t_small, 1e-6)
    fixed = max(t_small - flops_small / rate, 0.0)
    bandwidth = measure_bandwidth(tier, device, folder=folder)
    return CostModel(str(device), fixed, rate, bandwidth, tier, batch_size, dg.total_flops)
