"""fit: one training loop that drops settled segments and trains the rest from cached activations.

The loop reads as its phases: resume or start, then per epoch decide-and-drop, train, validate,
and end the epoch (record, checkpoint); then finish (evaluate the whole model, export). Batches
come from the run's feed (feeds.py); a drop replaces the feed and the trained module.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from .._io import FolderLock
from .._rng import epoch_order, rng_state, seed_all, seed_epoch, set_rng_state
from ..cache import CacheStore
from ..config import FitConfig
from ..errors import ConfigError, DivergedError, FxdropError
from ..graph import DropGraph, frozen_modules
from ..policies import LearnDrop, Policy
from ..runs import RunDir
from .dropper import Dropper, EventFn
from .feeds import Batching
from .mixing import Mixing
from .step import evaluate, lr_left, make_optimizer, make_scheduler, train_step, validate
from .stopping import best_of, early_stop

__all__ = ["fit", "FitResult"]


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
    best_epoch: int | None = None  # the best validated epoch (numbered from 1): model-best.safetensors
    best_val_acc: float | None = None  # its validation accuracy
    stopped_early: dict[str, Any] | None = None  # when and why `patience` ended the run; None: it did not


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
    return execute(
        _Run,
        model,
        {"train": train_data, "val": val_data},
        policy or LearnDrop(),
        out_dir,
        resume,
        overwrite,
        on_event,
        FitConfig.from_kwargs(config),
    )


def execute(
    run_type: type["_Run"],
    model: nn.Module,
    data: dict[str, Dataset],
    policy: Policy,
    out_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    on_event: EventFn | None,
    cfg: FitConfig,
    **run_args: Any,
) -> FitResult:
    """Check the settings, join the process group, and run a `run_type` (a fit or an update)."""
    if cfg.compile and cfg.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(
            "compile",
            f"names an unknown torch.compile backend '{cfg.compile}'; use one of "
            f"{torch._dynamo.list_backends()}",
        )
    if run_type.checks_policy:
        policy.check(cfg.epochs)
    if len(data["val"]) == 0 or len(data["train"]) == 0:
        raise FxdropError("the training or validation set is empty; give both at least one sample")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = D.init_distributed(device, cfg.dist_timeout_s)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    run = None
    try:
        run = run_type(
            model, data, cfg, policy, device, info, on_event or (lambda kind, what: None), out_dir, **run_args
        )
        run.open_run_dir(resume, overwrite)
        return run.train()
    finally:
        if run is not None:
            run.release()
        D.shutdown(info)


def _timed(batches: Iterable, stretch: "_Stretch") -> Iterator:
    """`batches`, adding the seconds spent waiting for each one to `stretch.waited`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stretch.waited += time.perf_counter() - t0
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
            # compiled after one eager step, once a new suffix has settled whether it
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
    """One fit: the driver around a Dropper (the optimizer, the schedule, the run folder and the
    loop over epochs). Built by `fit`; `train()` runs it."""

    checks_policy = True  # the policy's settings are checked against this run's epochs
    keeps_best = True  # writes model-best.safetensors (an update's epochs are not the run's)

    def __init__(
        self,
        model: nn.Module,
        data: dict[str, Dataset],
        cfg: FitConfig,
        policy: Policy,
        device: torch.device,
        info: D.DistInfo,
        emit: EventFn,
        out_dir: str | Path | None,
        train_positions: torch.Tensor | None = None,
    ) -> None:
        self.t_start, self.out_dir = time.perf_counter(), out_dir
        self.model, self.data, self.cfg = model, data, cfg
        self.policy, self.info, self.emit = policy, info, emit
        on_cuda = device.type == "cuda"
        amp = cfg.amp if cfg.amp is not None else on_cuda
        channels_last = cfg.channels_last if cfg.channels_last is not None else on_cuda
        self.b = Batching(
            device, max(1, cfg.batch_size // info.world_size), amp, channels_last, cfg.num_workers
        )
        seed_all(cfg.seed)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        indices = {split: D.partition(len(ds), info) for split, ds in data.items()}
        if train_positions is not None:  # an update that replays only the new samples
            indices["train"] = train_positions[D.partition(len(train_positions), info)]
        if len(indices["train"]) == 0:
            raise FxdropError(
                f"{len(data['train'])} training samples cannot be shared by {info.world_size} processes"
            )
        self.steps_per_epoch = math.ceil(len(indices["train"]) / self.b.batch_size)
        self.tmp_cache = (
            None if (cfg.cache_dir or out_dir) else tempfile.TemporaryDirectory(prefix="fxdrop-cache-")
        )
        self.store = self.make_store()
        # the model trains as the user hands it over: what is frozen stays frozen, said once
        self.frozen_at_start = frozen_modules(model)
        if self.frozen_at_start:
            warnings.warn(
                f"fit: parameters of {', '.join(self.frozen_at_start[:6])}"
                f"{' ...' if len(self.frozen_at_start) > 6 else ''} have requires_grad=False and will not "
                "train; after DropGraph.split, call dg.unsplit() to train the whole model",
                stacklevel=3,
            )
        self.opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.sched = make_scheduler(self.opt, self.total_steps, int(cfg.warmup_epochs * self.steps_per_epoch))
        self.dropper = Dropper(
            model,
            data,
            cfg,
            policy,
            self.b,
            info,
            self.store,
            emit,
            self.steps_per_epoch,
            indices,
            schedule=self.sched.lr_lambdas[0],
        )
        self.runner = _Runner(model, info, device, cfg.compile)
        self.mixing = Mixing(cfg, self.dropper.dg.output_shape, info.rank)  # passes batches on if off
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.seconds_before, self.step = 0, 0.0, 0
        self.run_dir: RunDir | None = None
        self.cache_lock: FolderLock | None = None
        self.resuming = False
        self.checkpoint_bytes = 0
        self.written_resolved: dict[str, Any] | None = None  # config.json's "resolved", as last written
        self.stopped_early: dict[str, Any] | None = None  # set when `patience` ends the run
        # the best validated epoch's weights (CPU copy; checkpointed when not the checkpoint's model)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # this epoch's (sum of losses x samples, samples)

    # ---- phases ------------------------------------------------------------------------------

    def make_store(self) -> CacheStore:
        cfg, info = self.cfg, self.info
        root = cfg.cache_dir or (Path(self.out_dir) / "cache" if self.out_dir else self.tmp_cache.name)
        return CacheStore(root, "fp32", info.rank, info.world_size, owns_root=None if cfg.cache_dir else True)

    def open_run_dir(self, resume: bool, overwrite: bool) -> None:
        """The output folder and the cache store's lock. Only now, with the model traced and the
        policy's cuts valid, may `overwrite` delete a run."""
        if self.cfg.cache:
            self.store.check()
        if self.out_dir and self.info.is_main:
            self.run_dir = RunDir(self.out_dir, self._identity(), resume, overwrite, self.store)
        self.lock_cache()
        self.resuming = D.broadcast_object(self.run_dir.resuming if self.run_dir else False, self.info)
        if resume and not self.resuming:
            why = f"no finished epoch to resume in '{self.out_dir}': starting from scratch"
            self.emit("no_resume", {"reason": why})

    def lock_cache(self) -> None:
        if self.cfg.cache and self.info.is_main:
            self.cache_lock = self.store.lock()
        D.barrier(self.info)

    def train(self) -> FitResult:
        self.resume_or_start()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if self.stop_early():
                break
            t0 = time.perf_counter()
            self.decide_and_drop(epoch)
            record = self.train_epoch(epoch)
            record |= self.validate(epoch)
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
        self.dropper.begin()

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue from checkpoint `ck`: weights, cut, optimizer, schedule, policy and RNG state."""
        self.model.load_state_dict(ck["model"])
        self.history = ck["history"]
        self.start_epoch, self.seconds_before = ck["epoch"], ck["seconds"]
        best_here = self.history and best_of(self.history).epoch == ck["epoch"]
        self.best_state = ck["model"] if best_here else ck.get("best_model")
        self.step = self.start_epoch * self.steps_per_epoch
        if self.history:
            self.dropper.note_epoch(self.history[-1])
        self.dropper.load_state_dict(ck, self.step, [self.opt])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"][self.info.rank] if self.info.rank < len(ck["rng"]) else ck["rng"][0])

    def stop_early(self) -> bool:
        """Whether `patience` validated epochs have passed without improvement (also read at a
        resume: a run that stopped early stays stopped unless `patience` is now larger or off)."""
        self.stopped_early = early_stop(self.history, self.cfg.patience)
        if self.stopped_early:
            self.emit("stopped_early", self.stopped_early)
        return self.stopped_early is not None

    def decide_and_drop(self, epoch: int) -> bool:
        """Ask the Dropper; returns whether the feed changed."""
        lr = lr_left(self.sched, self.step, self.total_steps, self.steps_per_epoch)
        return self.dropper.decide(epoch, self.cfg.epochs, self.step, [self.opt], lr_left=lr) is not None

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's training samples. After every policy observation the cut
        may advance: the rest of the epoch then continues, in the same order, from the new feed."""
        cfg, t_epoch, dropper = self.cfg, time.perf_counter(), self.dropper
        order = epoch_order(len(dropper.images.indices["train"]), cfg.seed, epoch)
        self.emit(
            "epoch_start",
            {"epoch": epoch + 1, "epochs": cfg.epochs, "steps": self.steps_per_epoch, "cut": dropper.cut},
        )
        seed_epoch(cfg.seed, epoch)
        self.loss_sum = torch.zeros(2, dtype=torch.float64)
        dropper.epoch_start()
        done, steps, stretches = 0, 0, []  # samples and steps so far; the stretches at each cut
        while done < len(order):
            stretch = _Stretch(dropper.cut, dropper.feed.cached)
            dropped = self._train_stretch(epoch, order[done:], steps, stretch)
            stretches.append(stretch)
            steps += stretch.steps
            done = min(steps * self.b.batch_size, len(order))
            if not dropped:
                break
        D.all_reduce_sum(self.loss_sum, self.info)
        D.sync_buffers(self.model, self.info)
        for st in stretches:
            if st.steps:
                dropper.timed(st.cut, st.seconds / st.steps, st.waited / st.steps)
        train_s = sum(st.seconds for st in stretches)
        fractions = [(st.steps, *dropper.flops_fractions(st.cut, st.cached)) for st in stretches]
        total = max(steps, 1)
        return {
            "epoch": epoch + 1,
            "train_loss": (self.loss_sum[0] / max(self.loss_sum[1], 1)).item(),
            "train_seconds": round(time.perf_counter() - t_epoch, 3),  # drops within the epoch included
            "step_seconds": round(train_s / total, 6),  # mean training step, waiting for data included
            "data_seconds": round(sum(st.waited for st in stretches), 3),  # waiting for batches
            # per step of the epoch, as a fraction of the whole model's: the forward, and the
            # forward and backward
            "forward_flops_fraction": sum(n * f for n, f, _ in fractions) / total,
            "train_flops_fraction": sum(n * t for n, _, t in fractions) / total,
            "stretches": [
                {
                    "cut": st.cut,
                    "cached": st.cached,
                    "steps": st.steps,
                    "step_seconds": round(st.seconds / max(st.steps, 1), 6),
                    "forward_flops_fraction": f,
                    "train_flops_fraction": t,
                }
                for st, (_, f, t) in zip(stretches, fractions)
            ],
        }

    def _train_stretch(self, epoch: int, order: torch.Tensor, first_step: int, stretch: _Stretch) -> bool:
        """Train on `order` (the rest of the epoch) at the current cut until the cut advances;
        fills `stretch` and returns whether a drop ended it."""
        cfg, t0, dropper = self.cfg, time.perf_counter(), self.dropper
        if self.runner.net is not dropper.net:
            self.runner = _Runner(dropper.net, self.info, self.b.device, cfg.compile)
        dropper.net.train()
        batches = _timed(dropper.feed.train_batches(order, epoch), stretch)
        try:
            for x, y in batches:
                # images before a drop, the cut's activations after it, cached or not
                x, y = self.mixing(x, y, epoch, first_step + stretch.steps, stretch.cut)
                with dropper.landings.step(self.step):
                    loss = train_step(
                        self.runner,
                        x,
                        y,
                        self.opt,
                        self.b.amp,
                        cfg.label_smoothing,
                        cfg.clip_grad,
                        cfg.clip_mode,
                    ).item()
                self.runner.stepped()
                stretch.steps += 1
                step = first_step + stretch.steps  # in this epoch
                if not math.isfinite(loss):
                    raise DivergedError(
                        f"training diverged at epoch {epoch + 1}, step {step} (loss {loss}); the last "
                        "good checkpoint is kept and nothing was exported; lower `lr` and resume or rerun"
                    )
                lr = self.opt.param_groups[0]["lr"]
                self.sched.step()
                self.step += 1
                self.loss_sum += torch.tensor([loss * len(y), len(y)], dtype=torch.float64)
                self.emit(
                    "step", {"epoch": epoch + 1, "step": step, "steps": self.steps_per_epoch, "loss": loss}
                )
                if dropper.stepped(step, lr, loss, run_step=self.step):
                    seconds = time.perf_counter() - t0
                    if step < self.steps_per_epoch and self.decide_and_drop(epoch):
                        stretch.seconds = seconds
                        return True
        finally:
            batches.close()  # a disk tier's read-ahead thread stops when its generator closes
        stretch.seconds = time.perf_counter() - t0
        return False

    def validate(self, epoch: int) -> dict[str, float | None]:
        """The epoch record's `val_acc` and `val_loss` (None: not validated this epoch)."""
        if (epoch + 1) % self.cfg.eval_every and epoch + 1 != self.cfg.epochs:
            return {"val_acc": None, "val_loss": None}
        acc, loss = validate(self.dropper.net, self.dropper.feed.val_batches(), self.info, self.b.amp)
        return {"val_acc": acc, "val_loss": loss}

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        dropper = self.dropper
        cp = dropper.dg.cut_points[dropper.cut] if dropper.cut >= 0 else None
        record |= {
            "cut": dropper.cut,
            "cut_module": cp.module if cp else None,
            "lr": self.sched.get_last_lr()[0],
        }
        dropper.epoch_end(epoch, record, self.history)
        self.history.append(record)
        self.emit("epoch_end", record)
        now_best = best_of(self.history).epoch == epoch + 1
        if self.keeps_best and now_best:
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.keeps_best and self.run_dir:
            self.run_dir.write_summary(self.history)
        all_rng = D.gather_objects(rng_state(), self.info)
        self.update_config()
        if self.run_dir:
            self.checkpoint_bytes = self.save_checkpoint(
                {
                    "epoch": epoch + 1,
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "history": self.history,
                    "rng": all_rng,
                    # the best epoch's weights; None: they are "model" (this epoch), or none yet
                    "best_model": None if now_best else self.best_state,
                    **dropper.state_dict(),
                    "seconds": self.seconds_before + time.perf_counter() - self.t_start,
                }
            )
            self.emit("checkpoint", {"epoch": epoch + 1, "bytes": self.checkpoint_bytes})

    def finish(self) -> FitResult:
        dropper = self.dropper
        final_acc = evaluate(self.model, dropper.images.val_batches(), self.info, self.b.amp)
        total = self.seconds_before + time.perf_counter() - self.t_start
        nbytes = dropper.feed.nbytes
        flops = {k: _per_step(self.history, k) for k in ("forward_flops_fraction", "train_flops_fraction")}
        no_drop = dropper.no_drop_reason()
        if no_drop:
            self.emit("no_drop", {"reason": no_drop, "cut": dropper.cut})
        best = best_of(self.history)
        result = FitResult(
            self.model,
            self.history,
            dropper.events,
            total,
            final_acc,
            dropper.cut,
            dropper.dg,
            nbytes,
            checkpoint_bytes=self.checkpoint_bytes,
            no_drop=no_drop,
            best_epoch=best.epoch,
            best_val_acc=best.val_acc,
            stopped_early=self.stopped_early,
            **flops,
        )
        if self.run_dir:
            self.run_dir.export(self.model)
            if self.keeps_best and self.best_state is not None:
                self.export_best()
            self.write_metrics(
                {
                    "epochs": self.history,
                    "events": dropper.events,
                    "total_seconds": total,
                    "final_val_acc": final_acc,
                    "best_epoch": best.epoch,  # its weights: model-best.safetensors
                    "best_val_acc": best.val_acc,
                    "stopped_early": self.stopped_early,
                    "cache_bytes": nbytes,
                    "world_size": self.info.world_size,
                    "declined_drops": dropper.declined,
                    "steps_per_epoch": self.steps_per_epoch,
                    **flops,
                    "checkpoint_bytes": self.checkpoint_bytes,
                    "no_drop": no_drop,
                    "decide_seconds": dropper.decide_seconds(),
                    "cache_build_seconds": dropper.cache_build_seconds(),
                    "cache_builds": dropper.cache_builds,
                    "cache_rebuilds": dropper.cache_rebuilds,  # caches found failing a check
                    "val_at_chance": dropper.val_at_chance,
                    "frozen_at_start": self.frozen_at_start,  # modules the model came with frozen
                    "landings": dropper.landing_events,
                    "step_costs": dropper.costs.to_dict() if dropper.costs else None,
                    "policy": self.policy.describe() | {"observations": self.policy.report(dropper.pstate)},
                }
            )
        dropper.close(keep_cache=self.tmp_cache is None and self.cfg.keep_cache)
        if self.tmp_cache is not None:
            self.tmp_cache.cleanup()
        return result

    # ---- what a run writes and reads (an update's differ: update_run.py) ---------------------------

    def write_config(self) -> None:
        # a resumed run may train more epochs; config.json says what this run does: "config" as
        # asked, "resolved" as used where the config left the choice to fxdrop
        self.written_resolved = self.resolved()
        self.run_dir.write_config(
            {
                "identity": self._identity(),
                "config": self.cfg.to_dict(),
                "resolved": self.written_resolved,
                "policy": self.policy.describe(),
            }
        )

    def resolved(self) -> dict[str, Any]:
        """The settings this run uses: the learning rate, device, AMP, channels-last and image
        size it chose, and the format and tier of the cache it trains from (None: no cache yet)."""
        b, feed = self.b, self.dropper.feed
        size = [int(n) for n in self.dropper.dg.example_input.shape[2:]]
        return {
            "lr": self.cfg.resolved_lr(),
            "device": str(b.device),
            "amp": b.amp,
            "channels_last": b.channels_last,
            "img_size": size[0] if len(set(size)) == 1 else size,
            "batch_size_per_rank": b.batch_size,
            "world_size": self.info.world_size,
            "cache_dtype": feed.placement.fmt if feed.placement else None,
            "cache_tier": feed.tier_name,
        }

    def update_config(self) -> None:
        """Rewrite config.json when what the run uses changed (a drop chose a cache format)."""
        if self.run_dir and self.resolved() != self.written_resolved:
            self.write_config()

    def export_best(self) -> None:
        """model-best.safetensors: the best epoch's weights (the model's, put back after)."""
        live = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict(self.best_state)
            self.run_dir.export(self.model, "model-best.safetensors")
        finally:
            self.model.load_state_dict(live)

    def load_checkpoint(self) -> dict[str, Any]:
        return self.run_dir.load_checkpoint()

    def save_checkpoint(self, state: dict[str, Any]) -> int:
        return self.run_dir.save_checkpoint(state)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.run_dir.write_metrics(metrics)
        self.run_dir.write_samples(self.dropper.images.keys)

    # ---- helpers -----------------------------------------------------------------------------

    def release(self) -> None:
        """Give back the folder locks (also on errors)."""
        for lock in (self.run_dir, self.cache_lock):
            if lock is not None:
                lock.release()

    def _identity(self) -> dict[str, Any]:
        """What makes two runs the same run (a resumed run may change epochs, device, workers)."""
        full = {"policy": self.policy.describe()} | self.cfg.to_dict() | self.cfg.extra
        return {
            k: full.get(k)
            for k in (
                "policy",
                "seed",
                "batch_size",
                "optimizer",
                "lr",
                "cache",
                "cache_views",
                "cache_dtype",
                "model",
                "data",
            )
        }


def _per_step(history: list[dict[str, Any]], key: str) -> float:
    """The mean of an epoch record's per-step `key` over every step of `history`."""
    steps = [sum(st["steps"] for st in h["stretches"]) for h in history]
    return sum(n * h[key] for n, h in zip(steps, history)) / max(sum(steps), 1)
