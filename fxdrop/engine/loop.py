"""fit: one training loop that drops settled segments and trains the rest from cached activations.

The loop reads as its phases: resume or start, then per epoch decide-and-drop, train, validate,
and end the epoch (record, checkpoint); then finish (evaluate the whole model, export). Batches
come from the run's feed (feeds.py); a drop replaces the feed and the trained module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as D
from .._io import FolderLock
from .._rng import rng_state, seed_all, set_rng_state
from ..config import FitConfig
from ..errors import ConfigError, FxdropError
from ..policies import LearnDrop, Policy
from ..records import (
    Checkpoint,
    Emit,
    Epoch,
    EventFn,
    NoDrop,
    StoppedEarly,
    emitter,
)
from ..runs import RunDir
from .dropper import Dropper
from .epoch import EpochTrainer
from .result import FitResult, per_step_flops
from .run_kinds import FitStart, FitWrites, Start, Writes, metrics_of
from .setup import frozen_at_start, set_up
from .step import evaluate, make_optimizer, make_scheduler, train_step, validate
from .stopping import best_of, early_stop
from .tensorboard import TensorBoard

__all__ = ["fit", "FitResult"]


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
        on_event: called as `on_event(record.kind, record)` with each record the run reports
            (`fxdrop.records`): `EpochStart`, `Step`, `CacheProgress`, `Drop`, `CacheBuild`,
            `CacheRebuilt`, `Landing`, `LandingCancelled`, `Epoch` ("epoch_end"), `Checkpoint`,
            `ValAtChance`, `StoppedEarly`, `NoResume`, `NoDrop`.
        **config: fields of :class:`FitConfig` (epochs, batch_size, lr, optimizer, cache_dtype, ...),
            all checked before anything is traced or written.

    Returns:
        FitResult with the trained model, per-epoch history and drop events.

    Example:
        >>> result = fxdrop.fit(model, train_ds, val_ds, policy=fxdrop.LearnDrop(), epochs=5)
        >>> result.final_val_acc
    """
    cfg, policy = FitConfig.from_kwargs(config), policy or LearnDrop()
    policy.check(cfg.epochs)
    data = {"train": train_data, "val": val_data}
    return fit_checked(model, data, policy, cfg, out_dir, resume, overwrite, on_event)


def fit_checked(
    model: nn.Module,
    data: dict[str, Dataset],
    policy: Policy,
    cfg: FitConfig,
    out_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    on_event: EventFn | None,
) -> FitResult:
    """`fit` once its settings are checked: `cfg` built and `policy` checked against its epochs
    (`finetune` checks them before it builds anything)."""
    return execute(model, data, policy, out_dir, resume, overwrite, on_event, cfg, FitStart(), FitWrites())


def execute(
    model: nn.Module,
    data: dict[str, Dataset],
    policy: Policy,
    out_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    on_event: EventFn | None,
    cfg: FitConfig,
    start: Start,
    writes: Writes,
) -> FitResult:
    """Check what the config alone cannot (the compile backend, the data), join the process
    group, and run: a fit, or with an update's `start` and `writes`, an update (whose policy was
    checked for its run)."""
    if cfg.compile and cfg.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(
            "compile",
            f"names an unknown torch.compile backend '{cfg.compile}'; use one of "
            f"{torch._dynamo.list_backends()}",
        )
    if len(data["val"]) == 0 or len(data["train"]) == 0:
        raise FxdropError("the training or validation set is empty; give both at least one sample")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = D.init_distributed(device, cfg.dist_timeout_s)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    run = None
    try:
        run = _Run(model, data, cfg, policy, device, info, emitter(on_event), out_dir, start, writes)
        run.open_run_dir(resume, overwrite)
        return run.train()
    finally:
        if run is not None:
            run.release()
        D.shutdown(info)


class _Run:
    """One fit: the driver around a Dropper (the optimizer, the schedule, the run folder and the
    loop over epochs, each trained by its `EpochTrainer`, epoch.py). Built by `fit`; `train()` runs it."""

    def __init__(
        self,
        model: nn.Module,
        data: dict[str, Dataset],
        cfg: FitConfig,
        policy: Policy,
        device: torch.device,
        info: D.DistInfo,
        emit: Emit,
        out_dir: str | Path | None,
        start: Start,
        writes: Writes,
    ) -> None:
        self.t_start, self.out_dir, self.start, self.writes = time.perf_counter(), out_dir, start, writes
        self.model, self.data, self.cfg = model, data, cfg
        self.policy, self.info, self.emit = policy, info, emit
        seed_all(cfg.seed)
        setup = set_up(model, data, cfg, device, info, out_dir=out_dir, train_positions=start.train_positions)
        self.b, self.store, self.steps_per_epoch = setup.batching, setup.store, setup.steps_per_epoch
        self.frozen_at_start = frozen_at_start(model)  # said once; they stay frozen
        self.opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        total_steps = cfg.epochs * self.steps_per_epoch
        self.sched = make_scheduler(self.opt, total_steps, int(cfg.warmup_epochs * self.steps_per_epoch))
        # built once the schedule exists: its landings follow the schedule down
        self.dropper = Dropper(model, data, cfg, policy, setup, emit, schedule=self.sched.lr_lambdas[0])
        # the epochs' training: its steps, mixing, accumulation and the average of the weights (`ema`)
        self.trainer = EpochTrainer(model, self.dropper, setup, cfg, self.opt, self.sched, emit, train_step)
        self.tensorboard = TensorBoard(None)  # log_tensorboard's writer, once the run folder is open
        self.history: list[Epoch] = []
        self.start_epoch, self.seconds_before = 0, 0.0
        self.run_dir: RunDir | None = None
        self.cache_lock: FolderLock | None = None
        self.resuming = False
        self.checkpoint_bytes = 0
        self.stopped_early: StoppedEarly | None = None  # set when `patience` ends the run
        # the best validated epoch's weights (CPU copy; checkpointed when not the checkpoint's model)
        self.best_state: dict[str, torch.Tensor] | None = None

    # ---- phases ------------------------------------------------------------------------------

    def open_run_dir(self, resume: bool, overwrite: bool) -> None:
        """The output folder (as the run's start opens it) and the cache store's lock."""
        if self.cfg.cache:
            self.store.check()
        self.run_dir, self.resuming = self.start.open(self, resume, overwrite)
        if self.cfg.cache and self.info.is_main:
            self.cache_lock = self.store.lock()
        D.barrier(self.info)

    def train(self) -> FitResult:
        self.resume_or_start()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if self.stop_early():
                break
            t0 = time.perf_counter()
            self.trainer.decide_and_drop(epoch)
            t_train = time.perf_counter()
            stretches, loss = self.trainer.train(epoch)
            train_s = time.perf_counter() - t_train  # drops within the epoch included
            val = self.validate(epoch)
            lr = self.sched.get_last_lr()[0]
            # seconds: the drop before the epoch and validation included
            record = self.dropper.records.epoch(
                epoch, self.dropper.cut, stretches, loss, train_s, val, time.perf_counter() - t0, lr
            )
            self.end_epoch(epoch, record)
        return self.finish()

    def resume_or_start(self) -> None:
        self.writes.config(self)
        if self.run_dir and self.cfg.log_tensorboard:
            # a new run (or --overwrite) starts its events anew; an update adds to its run's
            fresh = not self.resuming and self.writes.keeps_best
            self.tensorboard = TensorBoard(self.run_dir.path / "tensorboard", fresh=fresh)
        if not self.resuming:
            self.start.begin(self)
            return
        self.restore(D.broadcast_object(self.start.load(self.run_dir) if self.run_dir else None, self.info))

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue from checkpoint `ck`: weights, cut, optimizer, schedule, policy and RNG state."""
        self.model.load_state_dict(ck["model"])
        self.history = [Epoch.from_json(h) for h in ck["history"]]
        self.start_epoch, self.seconds_before = ck["epoch"], ck["seconds"]
        best_here = self.history and best_of(self.history).epoch == ck["epoch"]
        self.best_state = self.trainer.ema.validated_in(ck) if best_here else ck.get("best_model")
        if self.history:
            self.dropper.note_epoch(self.history[-1])
        self.dropper.load_state_dict(ck, self.start_epoch * self.steps_per_epoch, [self.opt])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.trainer.ema.load_state_dict(ck, self.model)
        set_rng_state(ck["rng"][self.info.rank] if self.info.rank < len(ck["rng"]) else ck["rng"][0])
        self.start.restored(ck)

    def stop_early(self) -> bool:
        """Whether `patience` validated epochs have passed without improvement (also read at a
        resume: a run that stopped early stays stopped unless `patience` is now larger or off)."""
        self.stopped_early = early_stop(self.history, self.cfg.patience)
        if self.stopped_early:
            self.emit(self.stopped_early)
        return self.stopped_early is not None

    def validate(self, epoch: int) -> tuple[float | None, float | None]:
        """The epoch's validation accuracy and loss (None: not validated this epoch)."""
        if (epoch + 1) % self.cfg.eval_every and epoch + 1 != self.cfg.epochs:
            return None, None
        with self.trainer.ema.swapped_in(self.model):  # model_ema_eval: the averaged weights are validated
            acc, loss = validate(self.dropper.net, self.dropper.feed.val_batches(), self.info, self.b.amp)
        return acc, loss

    def end_epoch(self, epoch: int, record: Epoch) -> None:
        dropper = self.dropper
        dropper.epoch_end(epoch, record, self.history)
        self.history.append(record)
        self.emit(record)
        now_best = best_of(self.history).epoch == epoch + 1
        if self.writes.keeps_best and now_best:
            validated = self.trainer.ema.validated(self.model).state_dict()
            self.best_state = {k: v.detach().cpu().clone() for k, v in validated.items()}
        all_rng = D.gather_objects(rng_state(), self.info)
        self.writes.epoch_end(self)
        if self.run_dir:
            self.checkpoint_bytes = self.writes.checkpoint(
                self.run_dir,
                {
                    "epoch": epoch + 1,
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "history": [h.to_json() for h in self.history],
                    "rng": all_rng,
                    # the best epoch's validated weights; None: they are "model" ("ema" with
                    # model_ema_eval) of this epoch, or none yet
                    "best_model": None if now_best else self.best_state,
                    **self.trainer.ema.state_dict(),
                    **dropper.state_dict(),
                    "seconds": self.seconds_before + time.perf_counter() - self.t_start,
                },
            )
            self.emit(Checkpoint(epoch + 1, self.checkpoint_bytes))
        self.tensorboard.epoch(record, [e for e in dropper.events if e.epoch == epoch + 1])

    def finish(self) -> FitResult:
        dropper = self.dropper
        final_acc = evaluate(self.model, dropper.images.val_batches(), self.info, self.b.amp)
        total = self.seconds_before + time.perf_counter() - self.t_start
        nbytes = dropper.feed.nbytes
        forward, train = per_step_flops(self.history)
        no_drop = dropper.records.no_drop_reason(dropper.cut, dropper.policy)
        if no_drop:
            self.emit(NoDrop(no_drop, dropper.cut))
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
            forward_flops_fraction=forward,
            train_flops_fraction=train,
        )
        if self.run_dir:
            self.run_dir.export(self.model)
            self.trainer.ema.export(self.run_dir)
            result.update = self.writes.metrics(self, metrics_of(self, result))
        dropper.close()
        return result

    # ---- helpers -----------------------------------------------------------------------------

    def release(self) -> None:
        """Give back the folder locks and close the event files (also on errors)."""
        self.tensorboard.close()
        for lock in (self.run_dir, self.cache_lock):
            if lock is not None:
                lock.release()
