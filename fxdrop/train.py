"""fit: one training loop that drops settled segments and trains the rest from cached activations."""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as D
from ._state import preserve_modes
from .cache import DTYPES, ActivationCache, CacheData, DiskCacheData, choose_tier, fingerprint_of, tensors_hash
from .costmodel import DropCost, StepTimer, host_available_bytes, measure_bandwidth
from .config import FitConfig
from .errors import FxdropError
from .graph import DropGraph, trace
from .policies import LearnDrop, NoDrop, Policy
from .runs import RunDir, export_model

__all__ = ["fit", "FitResult", "evaluate"]

EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class FitResult:
    model: nn.Module  # the same object that was passed in, trained
    history: list[dict[str, Any]]  # one dict per epoch (metrics.json "epochs")
    events: list[dict[str, Any]]  # drop events: epoch, step, cut point, the scores that decided it
    total_seconds: float
    final_val_acc: float  # the whole model, evaluated on the val images at the end
    cut: int  # final cut point index (-1: nothing dropped)
    graph: DropGraph = field(repr=False)
    cache_bytes: int = 0


def _logits(out: Any) -> torch.Tensor:
    # reason: torchvision's inception/googlenet return (logits, aux) namedtuples in train mode
    return out[0] if isinstance(out, (tuple, list)) else out


def _epoch_order(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """Positions into `indices` in this epoch's shuffled order (same for cached and uncached runs)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(len(indices), generator=g)


def _set_view(dataset: Dataset, view: int) -> None:
    if hasattr(dataset, "set_view"):
        dataset.set_view(view)


def _data_fingerprint(dataset: Dataset) -> str:
    fp = getattr(dataset, "fingerprint", None)
    if callable(fp):
        return str(fp())
    # reason: a user dataset without a fingerprint: its type, size and three samples stand for it
    n = len(dataset)
    probe = [dataset[i][0] for i in sorted({0, n // 2, n - 1})]
    probe_hash = tensors_hash((str(i), t) for i, t in enumerate(probe))
    return fingerprint_of({"type": type(dataset).__qualname__, "n": n, "probe": probe_hash})


def _image_batches(dataset, indices, order, batch_size, workers, device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    sel = indices[order].tolist()
    # reason: its own generator, so iterating never draws from the global RNG that dropout uses
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sel, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    start = 0
    for x, y in loader:
        idx = torch.tensor(sel[start : start + len(y)])
        start += len(y)
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True), idx


def _timed(batches: Iterator, waited: list[float]) -> Iterator:
    """`batches`, adding the time spent waiting for each one to `waited[0]`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t0
        yield item


def _make_optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    lr = cfg.resolved_lr()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise FxdropError(f"unknown optimizer '{cfg.optimizer}'; use sgd or adamw")


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _drop_from_optimizer(opt: torch.optim.Optimizer) -> int:
    """Remove frozen parameters from the optimizer; every other parameter keeps its state."""
    removed = 0
    for group in opt.param_groups:
        keep = [p for p in group["params"] if p.requires_grad]
        for p in group["params"]:
            if not p.requires_grad:
                opt.state.pop(p, None)
                removed += 1
        group["params"] = keep
    return removed


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# reason: a step timed on this machine varies by a few percent between runs; a predicted gain
# smaller than that is noise, not a reason to rebuild the cache
_MIN_GAIN = 0.05


def _candidates(dg: DropGraph, cut: int, last: int, most: int) -> list[int]:
    """Cuts after `cut` up to `last` worth timing: among cuts that freeze the same parameters (only
    parameter-free segments between them) the one with the smallest activation, the latest on
    ties; at most `most` of those, evenly spaced and always including the deepest."""
    groups: list[list[int]] = []
    for k in range(cut + 1, last + 1):
        if groups and not dg.segments[k].param_names:
            groups[-1].append(k)
        else:
            groups.append([k])
    best = [min(g, key=lambda k: (dg.cut_points[k].bytes_per_sample, -k)) for g in groups]
    if len(best) <= most:
        return best
    if most == 1:
        return best[-1:]
    return sorted({best[round(i * (len(best) - 1) / (most - 1))] for i in range(most)})


def _choose_cut(
    dg: DropGraph, seg: int, cut: int, cost: DropCost | None, steps_left: int = 0, samples: int = 0, most: int = 4
) -> tuple[int, dict[str, Any]]:
    """The cut to move to when the policy allows dropping segments `<= seg`.

    Dropping segment `seg` also lets the cut pass the parameter-free segments after it. Without a
    cost model: among those equivalent cuts, the one with the smallest activation (then the
    latest). With one: among up to `most` candidates after the current cut (see `_candidates`),
    timed on this machine, the one that saves the most time over the `steps_left` steps of the run
    after paying for building its cache over `samples` samples; none (`cut`) unless that saving
    is positive and the step at least `_MIN_GAIN` faster, so no drop makes a step slower than the
    cut it replaces. Timing spends at most half of an optimistic bound on the saving: fewer
    candidates when steps are slow or few are left; none, and `cut` kept, when not even one fits.
    """
    last = seg
    while last + 1 < len(dg.cut_points) and not dg.segments[last + 1].param_names:
        last += 1
    if cost is None:
        return min(range(seg, last + 1), key=lambda k: (dg.cut_points[k].bytes_per_sample, -k)), {}
    candidates = _candidates(dg, cut, last, most)
    if steps_left <= cost.declined.get((cut, candidates[-1]), -1):
        # reason: the same choice was declined with at least as many steps left to repay it
        return cut, {"decision": "declined before at this cut, for the same candidates"}
    flops = dg.cut_points[cut].suffix_flops if cut >= 0 else dg.total_flops
    # reason: a step at the deepest candidate takes at least its share of the FLOPs (smaller
    # layers run fewer FLOP/s, never more), so this bounds what any candidate could save
    bound = steps_left * cost.observed_step_s * (1 - dg.cut_points[candidates[-1]].suffix_flops / flops)
    if cost.observed_step_s:
        # reason: timing may spend at most half of that bound; the current cut is timed too
        affordable = int(bound / 2 / cost.cut_timing_seconds()) - 1
        if affordable < 1:
            # timing_cost_s: the least timing can cost, the current cut and one candidate
            return cut, {"decision": "even a FLOPs-proportional step could not repay timing the candidates",
                         "predicted_saving_bound_s": round(bound, 3), "timing_cost_s": round(2 * cost.cut_timing_seconds(), 3)}
        candidates = _candidates(dg, cut, last, min(most, affordable))
    cost.timer.time_cuts([cut, *candidates])  # reason: the current cut too, in the same rounds
    now = cost.step_seconds(cut)
    saving = {k: (now - cost.step_seconds(k)) * steps_left - cost.build_seconds(cut, k, samples) for k in candidates}
    best = max(saving, key=lambda k: (saving[k], k))
    step = cost.step_seconds(best)
    why = {"predicted_step_s": round(step, 6), "predicted_step_s_before": round(now, 6),
           "ideal_step_s": round(cost.ideal_seconds(best), 6), "predicted_saving_s": round(saving[best], 3),
           "timed_cuts": sorted(saving)}
    if saving[best] > 0 and step < (1 - _MIN_GAIN) * now:
        return best, why
    cost.declined[(cut, candidates[-1])] = steps_left
    return cut, {"decision": "no candidate is faster enough to repay its cache"} | why


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], info: D.DistInfo, amp: bool) -> float:
    """Top-1 accuracy over `batches`, summed over ranks. The module's modes are restored."""
    correct = torch.zeros(2, dtype=torch.float64)
    with preserve_modes(model, training=False):
        for x, y in batches:
            with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
                pred = _logits(model(x)).argmax(-1)
            correct[0] += (pred == y).sum().item()
            correct[1] += len(y)
    D.all_reduce_sum(correct, info)
    return (correct[0] / max(correct[1], 1)).item()


class _Caches:
    """The activation caches (train and val) at the current cut, each in its tier."""

    def __init__(self, root: Path, info: D.DistInfo, dtype: torch.dtype) -> None:
        self.root, self.info, self.dtype = root, info, dtype
        self.data: dict[str, CacheData] = {}
        self.folders: dict[str, ActivationCache] = {}

    def folder(self, cut_name: str, cut_index: int, split: str) -> Path:
        return self.root / f"cut-{cut_index:03d}-{cut_name}" / f"{split}-rank{self.info.rank}of{self.info.world_size}"

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.folders.values())

    def build(self, split: str, folder: Path, fingerprint: str, blocks, device: torch.device, tier: str) -> bool:
        """Open the cache at `folder` if valid, else write it from `blocks()`; keep it in `tier`.
        Returns whether it was written."""
        found = ActivationCache.open(folder, fingerprint)
        written = found is None
        if written:
            info = {"split": split, "rank": self.info.rank, "world_size": self.info.world_size}
            found, data = ActivationCache.write(folder, fingerprint, blocks(), self.dtype, info, keep=tier != "disk")
        else:
            data = found.load("cpu") if tier != "disk" else None
        self.folders[split] = found
        if tier == "disk":
            self.data[split] = DiskCacheData(found)
        elif tier == "device":
            self.data[split] = CacheData(data.x.to(device), data.y.to(device), data.idx.to(device))
        elif tier == "pinned":
            self.data[split] = CacheData(data.x.cpu().pin_memory(), data.y.cpu(), data.idx.cpu())
        else:
            self.data[split] = CacheData(data.x.cpu(), data.y.cpu(), data.idx.cpu())
        return written

    def remove(self) -> None:
        for c in self.folders.values():
            ActivationCache.remove_files(c.root)
        self.folders, self.data = {}, {}


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    *,
    policy: Policy | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventFn | None = None,
    **config: Any,
) -> FitResult:
    """Train `model`, dropping its settled front segments and training the rest from cached activations.

    Args:
        model: any traceable nn.Module; trained in place and returned as `result.model`.
        train_data: map-style Dataset of `(image, label)`; a `set_view(v)` method, if present,
            selects the augmentation (cached views and data order are deterministic per seed).
        val_data: map-style Dataset of `(image, label)`, evaluated every epoch.
        policy: LearnDrop (default), FreezeOut, Fixed(cut, epoch) or NoDrop.
        out_dir: writes config.json, checkpoint.pt (each epoch), metrics.json, model.safetensors.
        resume: continue the run in `out_dir` from its last finished epoch.
        overwrite: replace the run in `out_dir`.
        on_event: called as `on_event(kind, info)` for progress: "epoch_start", "step",
            "cache", "drop", "epoch_end".
        **config: fields of :class:`FitConfig` (epochs, batch_size, lr, optimizer, cache_dtype, ...).

    Returns:
        FitResult with the trained model, per-epoch history and drop events.

    Example:
        >>> result = fxdrop.fit(model, train_ds, val_ds, policy=fxdrop.LearnDrop(), epochs=5)
        >>> result.final_val_acc
    """
    cfg = FitConfig(**config)
    if cfg.compile and cfg.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise FxdropError(f"unknown torch.compile backend '{cfg.compile}'; use one of {torch._dynamo.list_backends()}")
    policy = policy if policy is not None else LearnDrop()
    emit = on_event or (lambda kind, info: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = D.init_distributed(device, cfg.dist_timeout_s)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    try:
        return _fit(model, train_data, val_data, cfg, policy, out_dir, resume, overwrite, emit, device, info)
    finally:
        D.shutdown(info)


def _fit(model, train_data, val_data, cfg, policy, out_dir, resume, overwrite, emit, device, info) -> FitResult:
    t_start = time.perf_counter()
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    cache_dtype = DTYPES[cfg.cache_dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if len(train_data) < info.world_size or len(val_data) == 0:
        raise FxdropError("the training or validation set is empty")
    identity = {"policy": policy.describe()} | {k: v for k, v in cfg.to_dict().items() if k != "extra"} | cfg.extra
    identity = {k: identity.get(k) for k in ("policy", "seed", "batch_size", "optimizer", "lr", "cache", "cache_views", "cache_dtype", "model", "data")}
    tmp_cache = None
    if cfg.cache_dir:
        cache_root = Path(cfg.cache_dir)
    elif out_dir:
        cache_root = Path(out_dir) / "cache"
    else:
        tmp_cache = tempfile.TemporaryDirectory(prefix="fxdrop-cache-")
        cache_root = Path(tmp_cache.name)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    example = torch.stack([train_data[i][0] for i in range(min(2, len(train_data)))]).to(device)
    dg = trace(model, example)
    segments = [list(s.param_names) for s in dg.segments]
    pstate = policy.init_state(segments)
    policy.resolve_cuts(pstate, lambda c: dg.cut_point(c).index)
    # reason: only now, with the model traced and the policy's cuts valid, may --overwrite delete a run
    run = RunDir(out_dir, identity, resume, overwrite) if (out_dir and info.is_main) else None
    D.barrier(info)
    resuming = D.broadcast_object(run.resuming if run else False, info)
    if cfg.cache:
        ActivationCache.check_root(cache_root)

    train_idx = D.partition(len(train_data), info)
    val_idx = D.partition(len(val_data), info)
    local_batch = max(1, cfg.batch_size // info.world_size)
    steps_per_epoch = math.ceil(len(train_idx) / local_batch)
    cache_samples = len(train_idx) * cfg.cache_views + len(val_idx)  # activations a drop caches

    def tier_for(k: int, samples: int) -> str:
        """The tier a cache of `samples` activations at cut `k` lives in: the fastest that fits."""
        nbytes = samples * dg.cut_points[k].bytes_per_sample * cache_dtype.itemsize // 4
        return cfg.cache_tier or choose_tier(nbytes, device, host_available_bytes(),
                                             torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0)

    cost: DropCost | None = None  # rank 0 decides where to cut; the others follow its broadcast
    if info.is_main and cfg.cache and cfg.cost_model and not policy.exact and not isinstance(policy, NoDrop):
        bandwidths: dict[str, float] = {}

        def bandwidth(k: int) -> float:
            tier = tier_for(k, len(train_idx) * cfg.cache_views)
            if tier not in bandwidths:
                folder = cache_root.parent if cache_root.parent.is_dir() else None
                bandwidths[tier] = measure_bandwidth(tier, device, folder=str(folder) if folder else None)
            return bandwidths[tier]

        timer = StepTimer(dg, local_batch, device, amp, channels_last, make_optimizer=lambda ps: _make_optimizer(ps, cfg))
        cost = DropCost(dg, timer, bandwidth, cache_dtype.itemsize)
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    )
    observe_every = max(1, round(policy.interval * steps_per_epoch))
    caches = _Caches(cache_root, info, cache_dtype)
    cut = -1
    prefix = suffix = None
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    declined: list[dict[str, Any]] = []  # drops the policy allowed but the cost model refused
    start_epoch = 0
    seconds_before = 0.0

    def build_caches(old_cut: int, new_cut: int, old: dict[str, CacheData]) -> bool:
        """Cache the activations at `new_cut`: from the images, or from the caches at `old_cut`.
        Returns whether anything was written (False: valid caches were reopened)."""
        written = False
        cp = dg.cut_points[new_cut]
        weights = tensors_hash(sorted(prefix.state_dict().items()))
        for split, dataset, idx in (("train", train_data, train_idx), ("val", val_data, val_idx)):
            views = cfg.cache_views if split == "train" else 1
            fp = fingerprint_of({
                "prefix": prefix.eval_gm.code, "weights": weights, "cut": cp.name, "dtype": str(cache_dtype),
                "data": _data_fingerprint(dataset), "views": views, "rank": info.rank, "world": info.world_size,
            })

            def from_images(dataset=dataset, idx=idx, views=views, split=split):
                order = torch.arange(len(idx))
                for v in range(views):
                    _set_view(dataset, v)
                    for i, (x, y, sid) in enumerate(_image_batches(dataset, idx, order, 2 * local_batch, cfg.num_workers, device)):
                        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                            a = prefix(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
                        emit("cache", {"split": split, "view": v, "done": min((i + 1) * 2 * local_batch, len(idx)), "total": len(idx)})
                        yield a, y, sid, v

            def from_cache(split=split):
                mid = dg.between(old_cut, new_cut)
                for a, y, sid, v in old[split].blocks(2 * local_batch):
                    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        b = mid(a.to(device).float())
                    yield b, y, sid, v

            written |= caches.build(split, caches.folder(cp.name, cp.index, split), fp,
                                    from_images if old_cut < 0 else from_cache, device, tier_for(new_cut, len(idx) * views))
        return written

    def apply_drop(new_cut: int, epoch: int, why: dict[str, Any], step: int) -> None:
        nonlocal cut, prefix, suffix
        old_cut, old_data, old_folders = cut, dict(caches.data), dict(caches.folders)
        prefix, suffix = dg.split(new_cut)
        removed = _drop_from_optimizer(opt)
        t0 = time.perf_counter()
        if cfg.cache:
            if build_caches(old_cut, new_cut, old_data) and cost is not None:
                cost.built(old_cut, new_cut, cache_samples, time.perf_counter() - t0)
            for split, folder in old_folders.items():
                if folder.root != caches.folders[split].root:
                    ActivationCache.remove_files(folder.root)
        cut = new_cut
        cp = dg.cut_points[cut]
        event = {
            "epoch": epoch, "step": step, "cut": cut, "node": cp.name, "module": cp.module,
            "forward_flops_fraction": cp.suffix_flops / dg.total_flops, "frozen_params": cp.prefix_params,
            "removed_from_optimizer": removed, "cache_seconds": round(time.perf_counter() - t0, 3),
            "cache_bytes": caches.nbytes if cfg.cache else 0,
            "cache_tier": caches.data["train"].tier if cfg.cache else None, "why": why,
        }
        events.append(event)
        emit("drop", event)

    if resuming:
        ck = run.load_checkpoint() if run else None
        ck = D.broadcast_object(ck, info)
        model.load_state_dict(ck["model"])
        pstate, history, events = ck["policy"], ck["history"], ck["events"]
        start_epoch, seconds_before = ck["epoch"], ck["seconds"]
        if ck["cut"] >= 0:
            # reason: rebuilding at the saved cut reopens the cache there (same prefix weights)
            prefix, suffix = dg.split(ck["cut"])
            _drop_from_optimizer(opt)
            if cfg.cache:
                build_caches(-1, ck["cut"], {})
            cut = ck["cut"]
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"][info.rank] if info.rank < len(ck["rng"]) else ck["rng"][0])
    elif run:
        run.write_json("config.json", {"identity": identity, "config": cfg.to_dict(), "policy": policy.describe()})

    step = start_epoch * steps_per_epoch
    trainable: nn.Module = model
    wrapped_for: nn.Module | None = None
    compiled: nn.Module | None = None  # torch.compile of `trainable` (cfg.compile), after its first step
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        seg, why = policy.target(pstate, epoch, cfg.epochs, cut)
        seg = D.broadcast_object(seg, info)  # reason: identical decisions on every rank
        if seg > cut:
            if policy.exact:
                new_cut, predicted = seg, {}
            else:
                t0 = time.perf_counter()
                steps_left = (cfg.epochs - epoch) * steps_per_epoch
                choice = _choose_cut(dg, seg, cut, cost, steps_left, cache_samples) if info.is_main else None
                new_cut, predicted = D.broadcast_object(choice, info)
                predicted["decide_seconds"] = round(time.perf_counter() - t0, 3)  # timing the candidate cuts
            if new_cut > cut:
                apply_drop(new_cut, epoch, why | predicted, step)
            else:
                declined.append({"epoch": epoch, "step": step, "kept": cut, "allowed": seg, **predicted})
        module = model if cut < 0 else suffix
        if wrapped_for is not module:
            # reason: DDP and compilation are redone only when the trainable module changes (start, drop)
            trainable, wrapped_for, compiled = D.wrap_ddp(module, info, device), module, None
        order = _epoch_order(train_idx, cfg.seed, epoch)
        view = epoch if cut < 0 else epoch % cfg.cache_views
        emit("epoch_start", {"epoch": epoch, "epochs": cfg.epochs, "steps": steps_per_epoch, "cut": cut})
        if cut >= 0 and cfg.cache:
            batches = caches.data["train"].batches(order, local_batch, view, device)
        else:
            _set_view(train_data, view)
            batches = ((x, y) for x, y, _ in _image_batches(train_data, train_idx, order, local_batch, cfg.num_workers, device))
        trainable.train()
        t_loop, waited = time.perf_counter(), [0.0]  # waited: seconds spent waiting for batches
        batches = _timed(batches, waited)
        # reason: dropout / drop-path draw from a stream fixed per epoch, whatever ran before
        # (cache building, a resume), so cached, uncached and resumed runs see the same masks
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        lr_sum = 0.0  # learning rates of this observation interval
        for i, (x, y) in enumerate(batches):
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                if cut >= 0 and cfg.cache:
                    x = x.to(device, non_blocking=True).float()
                elif cut >= 0:
                    with torch.no_grad():
                        x = prefix(x)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                net = trainable if compiled is None else compiled
                loss = F.cross_entropy(_logits(net(x)).float(), y.to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.compile and compiled is None:
                # reason: compiled after one eager step, once a new suffix has settled whether it
                # copies its input (split.py); compiled before, dynamo compiles every suffix twice
                compiled = torch.compile(trainable, backend=cfg.compile)
            lr_sum += opt.param_groups[0]["lr"]
            sched.step()
            step += 1
            loss_sum[0] += loss.item() * len(y)
            loss_sum[1] += len(y)
            if (i + 1) % observe_every == 0:
                policy.observe(pstate, model, lr_sum / observe_every)
                lr_sum = 0.0
            emit("step", {"epoch": epoch, "step": i + 1, "steps": steps_per_epoch, "loss": loss.item()})
        D.all_reduce_sum(loss_sum, info)
        D.sync_buffers(model, info)
        train_seconds = time.perf_counter() - t_epoch
        step_seconds = (time.perf_counter() - t_loop) / steps_per_epoch
        if cost is not None:
            cost.observed_step_s = step_seconds
            if cut < 0:
                cost.image_step_s = waited[0] / steps_per_epoch

        val_acc = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            if cut >= 0 and cfg.cache:
                vb = caches.data["val"].batches(torch.arange(len(val_idx)), 2 * local_batch, 0, device)
                vb = ((x.float(), y) for x, y in vb)
                val_acc = evaluate(suffix, vb, info, amp)
            else:
                _set_view(val_data, 0)
                vb = ((x, y) for x, y, _ in _image_batches(val_data, val_idx, torch.arange(len(val_idx)), 2 * local_batch, cfg.num_workers, device))
                val_acc = evaluate(model, vb, info, amp)
        cp = dg.cut_points[cut] if cut >= 0 else None
        record = {
            "epoch": epoch,
            "train_loss": (loss_sum[0] / max(loss_sum[1], 1)).item(),
            "val_acc": val_acc,
            "seconds": round(time.perf_counter() - t_epoch, 3),
            "train_seconds": round(train_seconds, 3),  # includes building a cache after a drop
            "step_seconds": round(step_seconds, 6),  # mean training step, waiting for data included
            "data_seconds": round(waited[0], 3),  # waiting for batches (images or cached activations)
            "cut": cut,
            "cut_module": cp.module if cp else None,
            "forward_flops_fraction": (cp.suffix_flops / dg.total_flops) if cp else 1.0,
            "lr": sched.get_last_lr()[0],
        }
        history.append(record)
        emit("epoch_end", record)
        all_rng = D.gather_objects(_rng_state(), info)
        if run:
            run.save_checkpoint({
                "epoch": epoch + 1, "cut": cut, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "policy": pstate, "history": history, "events": events,
                "rng": all_rng, "seconds": seconds_before + time.perf_counter() - t_start,
            })

    _set_view(val_data, 0)
    vb = ((x, y) for x, y, _ in _image_batches(val_data, val_idx, torch.arange(len(val_idx)), 2 * local_batch, cfg.num_workers, device))
    final_acc = evaluate(model, vb, info, amp)
    total = seconds_before + time.perf_counter() - t_start
    result = FitResult(model, history, events, total, final_acc, cut, dg, caches.nbytes if cfg.cache else 0)
    if run:
        export_model(model, run.path / "model.safetensors", {"format": "pt", "producer": "fxdrop"})
        run.write_json("metrics.json", {
            "epochs": history, "events": events, "total_seconds": total, "final_val_acc": final_acc,
            "cache_bytes": result.cache_bytes, "world_size": info.world_size, "declined_drops": declined,
            "cost_model": cost.to_dict() if cost else None,
        })
    if tmp_cache is not None or not cfg.keep_cache:
        caches.remove()
        if cache_root.is_dir() and not any(cache_root.iterdir()):
            cache_root.rmdir()
    if tmp_cache is not None:
        tmp_cache.cleanup()
    return result
