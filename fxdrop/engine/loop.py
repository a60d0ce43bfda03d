"""fit: one training loop that drops settled segments and trains the rest from cached activations.

The loop reads as its phases: resume or start, then per epoch decide-and-drop, train, validate,
and end the epoch (record, checkpoint); then finish (evaluate the whole model, export). Batches
come from the run's feed (feeds.py); a drop replaces the feed and the trained module.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from .._rng import epoch_order, rng_state, seed_all, seed_epoch, set_rng_state
from ..cache import CacheStore, Placement, Reuse, choose_placement, codec, data_fingerprint, shard_bytes_for
from ..config import FitConfig
from ..cost import Decision, StepCosts, measure_bandwidth, measure_write_rate, segment_seconds
from ..errors import ConfigError, DivergedError, FxdropError
from ..graph import DropGraph, trace
from ..policies import LearnDrop, Policy
from ..runs import RunDir
from .feeds import Batching, CacheFeed, Feed, ImageFeed, PrefixFeed, build_cache_feed
from .step import drop_from_optimizer, evaluate, lr_left, make_optimizer, make_scheduler, train_step

__all__ = ["fit", "FitResult"]

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
    update: dict[str, Any] | None = None  # an update's entry in metrics.json "updates" (fxdrop.update)
    forward_flops_fraction: float = 1.0  # per training step over the run, of the whole model's forward
    train_flops_fraction: float = 1.0  # the same for forward and backward
    checkpoint_bytes: int = 0  # the size of the last checkpoint written
    no_drop: str | None = None  # why nothing was dropped, when nothing was


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
        policy: LearnDrop (default), AutoFreeze, FreezeOut, Fixed(cut, epoch), Schedule or NoDrop.
        out_dir: writes config.json, checkpoint.pt (each epoch), metrics.json, model.safetensors.
        resume: continue the run in `out_dir` from its last finished epoch.
        overwrite: replace the run in `out_dir`.
        on_event: called as `on_event(kind, info)` for progress: "epoch_start", "step",
            "cache", "drop", "epoch_end".
        **config: fields of :class:`FitConfig` (epochs, batch_size, lr, optimizer, cache_dtype, ...),
            all checked before anything is traced or written.

    Returns:
        FitResult with the trained model, per-epoch history and drop events.

    Example:
        >>> result = fxdrop.fit(model, train_ds, val_ds, policy=fxdrop.LearnDrop(), epochs=5)
        >>> result.final_val_acc
    """
    return execute(_Run, model, {"train": train_data, "val": val_data}, policy or LearnDrop(), out_dir, resume,
                   overwrite, on_event, FitConfig.from_kwargs(config))


def execute(run_type: type["_Run"], model: nn.Module, data: dict[str, Dataset], policy: Policy,
            out_dir: str | Path | None, resume: bool, overwrite: bool, on_event: EventFn | None, cfg: FitConfig,
            **run_args: Any) -> FitResult:
    """Check the settings, join the process group, and run a `run_type` (a fit or an update)."""
    if cfg.compile and cfg.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError("compile", f"names an unknown torch.compile backend '{cfg.compile}'; use one of "
                          f"{torch._dynamo.list_backends()}")
    if run_type is _Run:  # reason: an update continues a policy whose schedule was checked for its run
        policy.check(cfg.epochs)
    if len(data["val"]) == 0 or len(data["train"]) == 0:
        raise FxdropError("the training or validation set is empty; give both at least one sample")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = D.init_distributed(device, cfg.dist_timeout_s)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    run = None
    try:
        run = run_type(model, data, cfg, policy, device, info, on_event or (lambda kind, what: None), **run_args)
        run.open_run_dir(out_dir, resume, overwrite)
        return run.train()
    finally:
        if run is not None:
            run.release()
        D.shutdown(info)


def _timed(batches: Iterable, waited: list[float]) -> Iterator:
    """`batches`, adding the seconds spent waiting for each one to `waited[0]`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t0
        yield item


class _Runner:
    """The module being trained (`net`: the whole model, later a suffix), wrapped for DDP and,
    after its first eager step, compiled. Rebuilt whenever `net` changes."""

    def __init__(self, net: nn.Module, info: D.DistInfo, device: torch.device, backend: str | None) -> None:
        self.net, self.backend = net, backend
        self.wrapped = D.wrap_ddp(net, info, device)
        self.compiled: nn.Module | None = None

    def __call__(self, x: torch.Tensor) -> Any:
        return (self.compiled if self.compiled is not None else self.wrapped)(x)

    def stepped(self) -> None:
        if self.backend and self.compiled is None:
            # reason: compiled after one eager step, once a new suffix has settled whether it
            # copies its input (split.py); compiled before, dynamo compiles every suffix twice
            self.compiled = torch.compile(self.wrapped, backend=self.backend)


@dataclass
class _Stretch:
    """The steps of an epoch taken at one cut: the feed changes only between stretches."""

    cut: int
    cached: bool  # the prefix's activations came from the cache (else the prefix ran, freeze-only)
    steps: int = 0
    seconds: float = 0.0  # until the drop that ended it, if one did
    waited: float = 0.0  # waiting for batches


class _Run:
    """One fit: the state its phases share. Built by `fit`; `train()` runs it."""

    def __init__(self, model: nn.Module, data: dict[str, Dataset], cfg: FitConfig, policy: Policy,
                 device: torch.device, info: D.DistInfo, emit: EventFn,
                 train_positions: torch.Tensor | None = None) -> None:
        self.t_start = time.perf_counter()
        self.model, self.data, self.cfg, self.policy, self.info, self.emit = model, data, cfg, policy, info, emit
        on_cuda = device.type == "cuda"
        amp = cfg.amp if cfg.amp is not None else on_cuda
        channels_last = cfg.channels_last if cfg.channels_last is not None else on_cuda
        self.b = Batching(device, max(1, cfg.batch_size // info.world_size), amp, channels_last, cfg.num_workers)
        seed_all(cfg.seed)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        example = torch.stack([data["train"][i][0] for i in range(min(2, len(data["train"])))]).to(device)
        self.dg = trace(model, example)
        self.pstate = policy.init_state([list(s.param_names) for s in self.dg.segments])
        policy.resolve_cuts(self.pstate, lambda c: self.dg.cut_point(c).index)
        indices = {split: D.partition(len(ds), info) for split, ds in data.items()}
        if train_positions is not None:  # reason: an update that replays only the new samples
            indices["train"] = train_positions[D.partition(len(train_positions), info)]
        if len(indices["train"]) == 0:
            raise FxdropError(f"{len(data['train'])} training samples cannot be shared by {info.world_size} processes")
        self.images = ImageFeed(data, indices, self.b)
        self.feed: Feed = self.images
        self.steps_per_epoch = math.ceil(len(indices["train"]) / self.b.batch_size)
        self.opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.sched = make_scheduler(self.opt, self.total_steps, int(cfg.warmup_epochs * self.steps_per_epoch))
        self.cut, self.prefix, self.net = -1, None, model
        self.runner = _Runner(model, info, device, cfg.compile)
        self.costs: StepCosts | None = None  # measured at the first decision the cost model makes
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.declined: list[dict[str, Any]] = []  # drops the policy allowed but the costs refused
        self.cache_builds: list[dict[str, Any]] = []  # caches built at a cut reached freeze-only
        self.cut_step = 0  # the step at which the current cut was entered
        self.start_epoch, self.seconds_before, self.step = 0, 0.0, 0
        self.run_dir: RunDir | None = None
        self.resuming = False
        self.checkpoint_bytes = 0
        self.last_why: dict[str, Any] = {}  # the policy's last answer: why nothing was dropped, if nothing was

    # ---- phases ------------------------------------------------------------------------------

    def open_run_dir(self, out_dir: str | Path | None, resume: bool, overwrite: bool) -> None:
        """The output folder and the cache store. Only now, with the model traced and the
        policy's cuts valid, may `overwrite` delete a run."""
        cfg, info = self.cfg, self.info
        self._tmp_cache = None if (cfg.cache_dir or out_dir) else tempfile.TemporaryDirectory(prefix="fxdrop-cache-")
        root = cfg.cache_dir or (Path(out_dir) / "cache" if out_dir else self._tmp_cache.name)
        self.store = CacheStore(root, "fp32", info.rank, info.world_size,
                                owns_root=None if cfg.cache_dir else True)
        if cfg.cache:
            self.store.check()
        if out_dir and info.is_main:
            self.run_dir = RunDir(out_dir, self._identity(), resume, overwrite, self.store)
        if cfg.cache and info.is_main:
            self._cache_lock = self.store.lock()
        D.barrier(info)
        self.resuming = D.broadcast_object(self.run_dir.resuming if self.run_dir else False, info)

    def train(self) -> FitResult:
        self.resume_or_start()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            self.decide_and_drop(epoch)
            record = self.train_epoch(epoch)
            record["val_acc"] = self.validate(epoch)
            record["seconds"] = round(time.perf_counter() - t0, 3)  # the drop and validation included
            self.end_epoch(epoch, record)
        return self.finish()

    def resume_or_start(self) -> None:
        if self.run_dir:
            self.write_config()
        if not self.resuming:
            self.start()
            return
        self.restore(D.broadcast_object(self.load_checkpoint() if self.run_dir else None, self.info))

    def start(self) -> None:
        """A new run starts with the whole model training."""
        self.policy.begin(self.pstate, self.model)

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue from checkpoint `ck`: weights, cut, optimizer, schedule, policy and RNG state."""
        self.model.load_state_dict(ck["model"])
        self.pstate = self.policy.restore_state(ck["policy"], self.model)
        self.history, self.events = ck["history"], ck["events"]
        self.declined = ck.get("declined", [])
        self.cache_builds = ck.get("cache_builds", [])
        self.start_epoch, self.seconds_before = ck["epoch"], ck["seconds"]
        self.step = self.start_epoch * self.steps_per_epoch
        if ck["cut"] >= 0:
            # reason: reopens the cache at the saved cut (same prefix weights), or freeze-only again
            self._enter_cut(ck["cut"], cache=ck.get("cached", self.cfg.cache))
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"][self.info.rank] if self.info.rank < len(ck["rng"]) else ck["rng"][0])

    def decide_and_drop(self, epoch: int) -> bool:
        """Ask the policy how far the cut may go and the step costs where it should; apply a
        drop, or cache the current cut once freeze-only there has cost as much as the cache.
        Returns whether the feed changed."""
        self.policy.plan(self.pstate, lr_left(self.sched, self.step, self.total_steps, self.steps_per_epoch))
        seg, why = self.policy.target(self.pstate, epoch, self.cfg.epochs, self.cut)
        self.last_why = why
        seg = D.broadcast_object(seg, self.info)  # reason: identical decisions on every rank
        cached = self.feed.cached
        # reason: freeze-only at the allowed cut, its cache may have been rented long enough
        cache_due = seg == self.cut >= 0 and self.cfg.cache and not cached
        if seg <= self.cut and not cache_due:
            return False
        t0 = time.perf_counter()
        decision = D.broadcast_object(self._choose_cut(seg, epoch) if self.info.is_main else None, self.info)
        why = why | decision.why | {"decide_seconds": round(time.perf_counter() - t0, 4)}
        if decision.cut == self.cut and decision.cache and not cached:
            self._cache_current_cut(epoch, why)
            return True
        if decision.cut <= self.cut:
            if not decision.why.get("repeat"):  # reason: a repeat, asked again at every observation, says nothing new
                self.declined.append({"epoch": epoch + 1, "step": self.step, "kept": self.cut, "allowed": seg, **why})
            return False
        removed, cache_s, _ = self._enter_cut(decision.cut, cache=decision.cache)
        cp = self.dg.cut_points[self.cut]
        event = {
            "epoch": epoch + 1, "step": self.step, "cut": self.cut, "node": cp.name, "module": cp.module,
            "forward_flops_fraction": cp.suffix_flops / self.dg.total_flops, "frozen_params": cp.prefix_params,
            "removed_from_optimizer": removed, "cache_seconds": round(cache_s, 3),
            "cache_bytes": getattr(self.feed, "nbytes", 0), "cache_tier": self._tier_name(), **self._cache_format(),
            "cached": self.feed.cached, "why": why,
        }
        self.events.append(event)
        self.emit("drop", event)
        return True

    def _cache_current_cut(self, epoch: int, why: dict[str, Any]) -> None:
        """Freeze-only at the current cut has cost as much as its cache would: build it (the cut
        and the weights stay; only the feed changes)."""
        _, cache_s, _ = self._enter_cut(self.cut, cache=True)
        cp = self.dg.cut_points[self.cut]
        record = {"epoch": epoch + 1, "step": self.step, "cut": self.cut, "node": cp.name, "module": cp.module,
                  "cache_seconds": round(cache_s, 3), "cache_bytes": getattr(self.feed, "nbytes", 0),
                  "cache_tier": self._tier_name(), **self._cache_format(), "why": why}
        self.cache_builds.append(record)
        self.emit("cached", record)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's training samples. After every policy observation the cut
        may advance: the rest of the epoch then continues, in the same order, from the new feed."""
        cfg, t_epoch = self.cfg, time.perf_counter()
        order = epoch_order(len(self.images.indices["train"]), cfg.seed, epoch)
        self.emit("epoch_start", {"epoch": epoch + 1, "epochs": cfg.epochs, "steps": self.steps_per_epoch,
                                  "cut": self.cut})
        seed_epoch(cfg.seed, epoch)
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of losses x samples, samples)
        self.interval = [0.0, 0.0]  # this observation interval's summed learning rate and loss
        done, steps, stretches = 0, 0, []  # samples and steps so far; the stretches at each cut
        while done < len(order):
            stretch, t0, waited = _Stretch(self.cut, self.feed.cached), time.perf_counter(), [0.0]
            n, before_drop = self._train_stretch(epoch, order[done:], steps, waited)
            stretch.steps, stretch.waited = n, waited[0]
            stretch.seconds = time.perf_counter() - t0 if before_drop is None else before_drop
            stretches.append(stretch)
            steps += n
            done = min(steps * self.b.batch_size, len(order))
            if before_drop is None:
                break
        D.all_reduce_sum(self.loss_sum, self.info)
        D.sync_buffers(self.model, self.info)
        if self.costs is not None:
            for st in stretches:
                if st.steps:
                    self.costs.observe(st.cut, st.seconds / st.steps, st.waited / st.steps)
        train_s = sum(st.seconds for st in stretches)
        fractions = [(st.steps, *self._flops_fractions(st)) for st in stretches]
        total = max(steps, 1)
        return {
            "epoch": epoch + 1, "train_loss": (self.loss_sum[0] / max(self.loss_sum[1], 1)).item(),
            "train_seconds": round(time.perf_counter() - t_epoch, 3),  # drops within the epoch included
            "step_seconds": round(train_s / total, 6),  # mean training step, waiting for data included
            "data_seconds": round(sum(st.waited for st in stretches), 3),  # waiting for batches
            # per step of the epoch, as a fraction of the whole model's: the forward, and the
            # forward and backward (a backward costs about twice its forward)
            "forward_flops_fraction": sum(n * f for n, f, _ in fractions) / total,
            "train_flops_fraction": sum(n * t for n, _, t in fractions) / total,
            "stretches": [{"cut": st.cut, "cached": st.cached, "steps": st.steps, "forward_flops_fraction": f}
                          for st, (_, f, _) in zip(stretches, fractions)],
        }

    def _flops_fractions(self, stretch: "_Stretch") -> tuple[float, float]:
        """(forward, forward + backward) FLOPs of one step of `stretch`, as fractions of the whole
        model's: a frozen prefix recomputed every step (freeze-only) still runs its forward."""
        if stretch.cut < 0:
            return 1.0, 1.0
        suffix = self.dg.cut_points[stretch.cut].suffix_flops / self.dg.total_flops
        forward = suffix if stretch.cached else 1.0
        return forward, (forward + 2 * suffix) / 3

    def _train_stretch(self, epoch: int, order: torch.Tensor, first_step: int, waited: list[float]
                       ) -> tuple[int, float | None]:
        """Train on `order` (the rest of the epoch) at the current cut until the cut advances.
        Returns the steps taken and, when a drop ended the stretch, the stretch's seconds before it."""
        cfg, t0 = self.cfg, time.perf_counter()
        if self.runner.net is not self.net:
            self.runner = _Runner(self.net, self.info, self.b.device, cfg.compile)
        self.net.train()
        observe_every = max(1, round(self.policy.interval * self.steps_per_epoch))
        batches = _timed(self.feed.train_batches(order, epoch), waited)
        n = 0
        try:
            for x, y in batches:
                loss = train_step(self.runner, x, y, self.opt, self.b.amp, cfg.label_smoothing).item()
                self.runner.stepped()
                n += 1
                step = first_step + n  # in this epoch
                if not math.isfinite(loss):
                    raise DivergedError(f"training diverged at epoch {epoch + 1}, step {step} (loss {loss}); the last "
                                        "good checkpoint is kept and nothing was exported; lower `lr` and resume or rerun")
                self.interval[0] += self.opt.param_groups[0]["lr"]
                self.interval[1] += loss
                self.sched.step()
                self.step += 1
                self.loss_sum += torch.tensor([loss * len(y), len(y)], dtype=torch.float64)
                self.emit("step", {"epoch": epoch + 1, "step": step, "steps": self.steps_per_epoch, "loss": loss})
                if step % observe_every == 0:
                    self.policy.observe(self.pstate, self.model, self.interval[0] / observe_every,
                                        self.interval[1] / observe_every)
                    self.interval = [0.0, 0.0]
                    seconds = time.perf_counter() - t0
                    if step < self.steps_per_epoch and self.decide_and_drop(epoch):
                        return n, seconds
        finally:
            batches.close()  # reason: a disk tier's read-ahead thread stops when its generator closes
        return n, None

    def validate(self, epoch: int) -> float | None:
        if (epoch + 1) % self.cfg.eval_every and epoch + 1 != self.cfg.epochs:
            return None
        return evaluate(self.net, self.feed.val_batches(), self.info, self.b.amp)

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        cp = self.dg.cut_points[self.cut] if self.cut >= 0 else None
        record |= {"cut": self.cut, "cut_module": cp.module if cp else None, "lr": self.sched.get_last_lr()[0]}
        _judge_drops(self.events, self.history, record, len(self.data["val"]))
        self.history.append(record)
        self.policy.epoch_end(self.pstate, record, self.events[-1] if self.events and self.events[-1]["epoch"] == epoch + 1 else None)
        self.emit("epoch_end", record)
        all_rng = D.gather_objects(rng_state(), self.info)
        if self.run_dir:
            self.checkpoint_bytes = self.save_checkpoint({
                "epoch": epoch + 1, "cut": self.cut, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "policy": self.policy.checkpoint_state(self.pstate, self.model),
                "history": self.history, "events": self.events, "declined": self.declined, "rng": all_rng,
                "cache_builds": self.cache_builds,
                "cached": self.feed.cached,
                "seconds": self.seconds_before + time.perf_counter() - self.t_start,
            })

    def finish(self) -> FitResult:
        final_acc = evaluate(self.model, self.images.val_batches(), self.info, self.b.amp)
        total = self.seconds_before + time.perf_counter() - self.t_start
        nbytes = getattr(self.feed, "nbytes", 0)
        flops = {k: _per_step(self.history, k) for k in ("forward_flops_fraction", "train_flops_fraction")}
        no_drop = None if self.events else self._no_drop_reason()
        if no_drop:
            self.emit("no_drop", {"reason": no_drop})
        result = FitResult(self.model, self.history, self.events, total, final_acc, self.cut, self.dg, nbytes,
                           checkpoint_bytes=self.checkpoint_bytes, no_drop=no_drop, **flops)
        if self.run_dir:
            self.run_dir.export(self.model)
            self.write_metrics({
                "epochs": self.history, "events": self.events, "total_seconds": total, "final_val_acc": final_acc,
                "cache_bytes": nbytes, "world_size": self.info.world_size, "declined_drops": self.declined,
                "steps_per_epoch": self.steps_per_epoch, **flops, "checkpoint_bytes": self.checkpoint_bytes,
                "no_drop": no_drop,
                "decide_seconds": sum(e["why"].get("decide_seconds", 0.0) for e in self.events)
                + sum(d.get("decide_seconds", 0.0) for d in self.declined),
                "cache_build_seconds": sum(e["cache_seconds"] for e in [*self.events, *self.cache_builds]),
                "cache_builds": self.cache_builds,
                "step_costs": self.costs.to_dict() if self.costs else None,
                "policy": self.policy.describe() | {"observations": self.policy.report(self.pstate)},
            })
        if self._tmp_cache is not None or not self.cfg.keep_cache:
            for folder in getattr(self.feed, "folders", {}).values():
                self.store.remove(folder)
        self.store.remove_root_if_empty()
        if self._tmp_cache is not None:
            self._tmp_cache.cleanup()
        return result

    # ---- what a run writes and reads (an update's differ: update.py) ---------------------------

    def write_config(self) -> None:
        # reason: a resumed run may train more epochs; config.json says what this run does
        self.run_dir.write_config({"identity": self._identity(), "config": self.cfg.to_dict(),
                                   "policy": self.policy.describe()})

    def load_checkpoint(self) -> dict[str, Any]:
        return self.run_dir.load_checkpoint()

    def save_checkpoint(self, state: dict[str, Any]) -> int:
        return self.run_dir.save_checkpoint(state)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.run_dir.write_metrics(metrics)
        self.run_dir.write_samples(self.images.keys)

    # ---- helpers -----------------------------------------------------------------------------

    def release(self) -> None:
        """Give back the folder locks (also on errors)."""
        for lock in (self.run_dir, getattr(self, "_cache_lock", None)):
            if lock is not None:
                lock.release()

    def _identity(self) -> dict[str, Any]:
        """What makes two runs the same run (a resumed run may change epochs, device, workers)."""
        full = {"policy": self.policy.describe()} | self.cfg.to_dict() | self.cfg.extra
        return {k: full.get(k) for k in ("policy", "seed", "batch_size", "optimizer", "lr", "cache", "cache_views",
                                         "cache_dtype", "model", "data")}

    def _enter_cut(self, cut: int, cache: bool = True, prune: bool = False) -> tuple[int, float, Reuse]:
        """Split at `cut`, drop the frozen parameters from the optimizer, and switch the feed:
        with `cache`, a cache at `cut` (built from the current feed, or reopened and completed),
        else the images through the frozen prefix. `prune`: samples no longer in the data leave
        the cache.
        Returns (parameters removed, seconds spent caching, what the cache reused)."""
        old = self.feed
        self.prefix, self.net = self.dg.split(cut)
        removed = drop_from_optimizer(self.opt)
        t0, reuse = time.perf_counter(), Reuse()
        if cache and self.cfg.cache:
            source = old if isinstance(old, CacheFeed) else self.images
            self.feed, reuse = build_cache_feed(
                self.store, self.dg, source, self.images, cut, self.prefix, self.cfg.cache_views, self._data_fps(),
                self.b, lambda kept: self._placement(cut, kept), lambda info: self.emit("cache", info), prune,
                shard_bytes_for(self.cfg.cache_memory))
        else:
            self.feed = PrefixFeed(self.images, self.prefix, self.cfg.cache_views)
        if isinstance(old, CacheFeed):
            kept = getattr(self.feed, "folders", {})
            for split, folder in old.folders.items():
                if folder != kept.get(split):
                    self.store.remove(folder)
        seconds = time.perf_counter() - t0
        if reuse.new and not reuse.reused and self.costs is not None:
            self.costs.built(self.cut if old.cached else -1, cut, self._cache_samples(), seconds)
        self.cut, self.cut_step = cut, self.step
        return removed, seconds, reuse

    def _segment_name(self, s: int) -> str:
        """The module segment s ends with (the head after the last cut)."""
        if s >= len(self.dg.cut_points):
            return "the head"
        cp = self.dg.cut_points[s]
        return cp.module or cp.name

    def _no_drop_reason(self) -> str:
        """Why a run dropped nothing: the step costs declined what the policy allowed, or the
        policy's own reason."""
        if self.declined:
            last = self.declined[-1]
            return (f"the policy allowed dropping up to {self._segment_name(last['allowed'])}, but the step costs "
                    f"declined it ({last.get('decision', 'no saving')})")
        return self.policy.reason(self.last_why, self._segment_name)

    def _data_fps(self) -> dict[str, str]:
        if not hasattr(self, "_fps"):
            self._fps = {split: data_fingerprint(ds) for split, ds in self.data.items()}
        return self._fps

    def _cache_samples(self) -> int:
        return len(self.images.indices["train"]) * self.cfg.cache_views + len(self.images.indices["val"])

    def _tier_name(self) -> str | None:
        return self.feed.tiers["train"].name if isinstance(self.feed, CacheFeed) else None

    def _cache_format(self) -> dict[str, str]:
        """The current cache's format and why it was chosen (drop and build records)."""
        placement = self.feed.placement
        return {"cache_dtype": placement.fmt, "cache_dtype_why": placement.why} if placement else {}

    def _placement(self, cut: int, kept: str | None = None) -> Placement:
        """The format and tier of a cache at `cut` (measured free memory, `cache_memory`); under
        `auto`, a valid cache already there keeps its format `kept` (resume, update)."""
        samples, shape = self._cache_samples(), self.dg.cut_points[cut].shape
        fmt = kept if kept and self.cfg.cache_dtype == "auto" else self.cfg.cache_dtype
        placement = choose_placement(lambda f: samples * codec(f).sample_bytes(shape), self.b.device, fmt,
                                     self.cfg.cache_tier, self.b.amp, self.cfg.cache_memory)
        if fmt != self.cfg.cache_dtype:
            placement = replace(placement, why=f"{fmt}, as the cache already there was written")
        return placement

    def _choose_cut(self, seg: int, epoch: int) -> Decision:
        """Where the cut goes when the policy allows dropping segments up to `seg`: exactly there
        for exact policies; else among the cuts up to the last one that freezes no more
        parameters, by the step costs (or the smallest activation without a cost model)."""
        if self.policy.exact:
            return Decision(seg, {})
        last = seg
        while last + 1 < len(self.dg.cut_points) and not self.dg.segments[last + 1].param_names:
            last += 1
        if not (self.cfg.cache and self.cfg.cost_model):
            return Decision(min(range(seg, last + 1), key=lambda k: (self.dg.cut_points[k].bytes_per_sample, -k)), {},
                            cache=self.cfg.cache)
        steps_left = self.cfg.epochs * self.steps_per_epoch - self.step
        costs, cached = self._step_costs(), self.feed.cached
        rent = 0.0
        if self.cut >= 0 and not cached:  # reason: what freeze-only has cost more than a cache, since the cut moved
            rent = (self.step - self.cut_step) * max(costs.step_s(self.cut, cached=False) - costs.step_s(self.cut), 0.0)
        return costs.decide(self.cut, last, steps_left, self._cache_samples(), cached=cached, rent=rent)

    def _step_costs(self) -> StepCosts:
        """The run's step costs, measured at the first decision that needs them: one timed forward
        and forward+backward of every segment on a training batch, the write rate and, per tier,
        the read bandwidth."""
        if self.costs is not None:
            return self.costs
        n = min(self.b.batch_size, len(self.images.indices["train"]))
        x = next(self.images.images("train", torch.arange(n), 0, self.b.batch_size))[0]  # (B, C, H, W)
        folder = str(self.store.root.parent) if self.store.root.parent.is_dir() else None
        bandwidths: dict[str, float] = {}

        placements: dict[int, Placement] = {}

        def placement(k: int) -> Placement:
            if k not in placements:
                placements[k] = self._placement(k)
            return placements[k]

        def bandwidth(k: int) -> float:
            tier = placement(k).tier
            if tier not in bandwidths:
                bandwidths[tier] = measure_bandwidth(tier, self.b.device, folder=folder)
            return bandwidths[tier]

        forward, train = segment_seconds(self.dg, x, self.b.amp)
        self.costs = StepCosts(self.dg, forward, len(x), bandwidth, lambda k: codec(placement(k).fmt).sample_bytes(
            self.dg.cut_points[k].shape), train_s=train,
                               write_bytes_per_s=measure_write_rate(folder))
        if self.history:
            last = self.history[-1]
            self.costs.observe(self.cut, last["step_seconds"], last["data_seconds"] / self.steps_per_epoch)
        return self.costs


def _per_step(history: list[dict[str, Any]], key: str) -> float:
    """The mean of an epoch record's per-step `key` over every step of `history`."""
    steps = [sum(st["steps"] for st in h["stretches"]) for h in history]
    return sum(n * h[key] for n, h in zip(steps, history)) / max(sum(steps), 1)


def _judge_drops(events: list[dict[str, Any]], history: list[dict[str, Any]], record: dict[str, Any], n_val: int) -> None:
    """After the first validation that follows a drop, record whether the drop hurt: validation
    accuracy fell below the last one before the drop by more than twice its sampling noise
    (binomial standard error over `n_val` samples)."""
    acc = record.get("val_acc")
    if acc is None:
        return
    for event in events:
        if "val_acc_after" in event:
            continue
        before = [h["val_acc"] for h in history if h["epoch"] < event["epoch"] and h["val_acc"] is not None]
        if not before:
            event["val_acc_after"], event["hurt"] = acc, False
            continue
        noise = math.sqrt(max(before[-1] * (1 - before[-1]), 1e-4) / n_val)
        event |= {"val_acc_before": before[-1], "val_acc_after": acc, "val_noise": round(noise, 4),
                  "hurt": acc < before[-1] - 2 * noise}
