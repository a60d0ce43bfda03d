"""fxdrop inside PyTorch Lightning: `LayerDropping`, a callback that drives the same Dropper `fit`
drives.

    trainer = Trainer(max_epochs=20, callbacks=[LayerDropping(attr="model")])
    trainer.fit(module, train_loader, val_loader)

Until the first drop the Trainer runs as the user wrote it. At the start of an epoch the policy
may drop the front of `module.<attr>`: its frozen parameters leave the optimizers (every other
parameter keeps its state, groups and schedule), the prefix's activations are cached, and from
then on the training and validation batches are `(activations, labels)` from the cache, which
`module.<attr>` (its forward now the suffix's) takes as it took images. Under DDP the trained
module is wrapped again so the frozen parameters are not waited for. Checkpoints hold the
model's weights under their original names and an optimizer state any fresh optimizer of the
module loads; the callback's own state (cut, policy, records) resumes the drop. When `fit` ends,
`module.<attr>` is the whole model again, trained.

Requires `pip install fxdrop[lightning]`. Batches of the user's loaders are `(image, label)`;
drops are decided at epoch starts (a Trainer fetches a batch ahead, so a drop inside an epoch
would hand the new suffix a batch made for the old module).
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("fxdrop.lightning needs PyTorch Lightning: pip install 'fxdrop[lightning]'") from exc

from . import distributed as D
from ._rng import epoch_order
from .cache import CacheStore
from .config import FitConfig
from .engine.dropper import Dropper
from .engine.feeds import Batching
from .errors import ConfigError
from .policies import LearnDrop, Policy

__all__ = ["LayerDropping"]

# fit's settings that mean something inside a Trainer (the rest are the Trainer's: epochs, batch
# size, optimizer, devices)
OPTIONS = (
    "cache",
    "cache_dir",
    "cache_dtype",
    "cache_views",
    "cache_tier",
    "cache_memory",
    "keep_cache",
    "cost_model",
    "seed",
)


class LayerDropping(pl.Callback):
    """Drop the settled front of `pl_module.<attr>` during `trainer.fit` and train the rest from
    cached activations.

    Args:
        attr: the attribute of the LightningModule that holds the CNN (called as `attr(x)` in its
            `training_step` and `validation_step`).
        policy: when to drop (default: :class:`fxdrop.LearnDrop`).
        monitor: the logged validation accuracy (in `trainer.callback_metrics`) that judges
            whether a drop hurt; absent: not judged.
        **options: fit's cache settings: cache, cache_dir, cache_dtype, cache_views, cache_tier,
            cache_memory, keep_cache, cost_model, seed.

    Example:
        >>> trainer = Trainer(max_epochs=20, callbacks=[LayerDropping(attr="model", cache_dtype="bf16")])
        >>> trainer.fit(module, train_loader, val_loader)
    """

    def __init__(
        self, attr: str = "model", policy: Policy | None = None, monitor: str = "val_acc", **options: Any
    ) -> None:
        for name in options:
            if name not in OPTIONS:
                raise ConfigError(name, f"is not a LayerDropping option; known: {', '.join(OPTIONS)}")
        FitConfig.from_kwargs(options)  # checked now, not at the first drop
        self.attr, self.policy, self.monitor, self.options = attr, policy or LearnDrop(), monitor, options
        self.dropper: Dropper | None = None
        self.saved: dict[str, Any] | None = None  # the state a checkpoint gave, entered at train start
        self.history: list[dict[str, Any]] = []  # one record per epoch, as fit's metrics.json "epochs"
        self.full_groups: list[list[list[nn.Parameter]]] = []  # each optimizer's groups before any drop
        self.epoch_t0, self.epoch_steps = 0.0, 0
        self.tmp: tempfile.TemporaryDirectory | None = None

    # ---- Lightning's hooks -------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        train_loader = trainer.train_dataloader
        val_loader = self._val_loader(trainer)
        data = {"train": train_loader.dataset, "val": val_loader.dataset}
        info = D.init_distributed(pl_module.device)
        amp = str(trainer.precision).startswith("bf16")
        b = Batching(pl_module.device, train_loader.batch_size, amp, False, train_loader.num_workers)
        indices = {split: D.partition(len(ds), info) for split, ds in data.items()}
        steps_per_epoch = math.ceil(len(indices["train"]) / b.batch_size)
        cfg = FitConfig.from_kwargs(
            self.options | {"epochs": trainer.max_epochs, "batch_size": b.batch_size * info.world_size}
        )
        if cfg.cache_dir is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="fxdrop-cache-")
        store = CacheStore(
            cfg.cache_dir or self.tmp.name,
            "fp32",
            info.rank,
            info.world_size,
            owns_root=None if cfg.cache_dir else True,
        )
        self.dropper = Dropper(
            model, data, cfg, self.policy, b, info, store, lambda kind, what: None, steps_per_epoch, indices
        )
        self.full_groups = [[list(g["params"]) for g in opt.param_groups] for opt in trainer.optimizers]
        if self.saved is None:
            self.dropper.begin()
            return
        self.history = self.saved["history"]
        if self.history:
            self.dropper.note_epoch(self.history[-1])
        self.dropper.load_state_dict(self.saved["dropper"], trainer.global_step, trainer.optimizers)
        self.saved = None
        if self.dropper.cut >= 0:
            self._train_from_feed(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        drop = self.dropper.decide(epoch, trainer.max_epochs, trainer.global_step, trainer.optimizers)
        if drop is not None:
            self._train_from_feed(trainer, pl_module)
        self.dropper.epoch_start()
        self.epoch_t0, self.epoch_steps = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:  # the step was skipped (training_step returned None)
            return
        self.epoch_steps += 1
        self.dropper.stepped(batch_idx + 1, trainer.optimizers[0].param_groups[0]["lr"], float(loss))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dropper, epoch = self.dropper, trainer.current_epoch
        steps = max(self.epoch_steps, 1)
        step_s = (time.perf_counter() - self.epoch_t0) / steps
        dropper.timed(dropper.cut, step_s, 0.0)
        acc = trainer.callback_metrics.get(self.monitor)
        record = {
            "epoch": epoch + 1,
            "cut": dropper.cut,
            "cached": dropper.feed.cached,
            "steps": self.epoch_steps,
            "step_seconds": round(step_s, 6),
            "data_seconds": 0.0,
            "val_acc": float(acc) if acc is not None else None,
        }
        dropper.epoch_end(epoch, record, self.history)
        self.history.append(record)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        model.__dict__.pop("forward", None)  # the whole model again
        if self.dropper is not None:
            self.dropper.close(keep_cache=self.tmp is None and self.dropper.cfg.keep_cache)
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a fresh optimizer of the module holds every parameter: the saved state names the frozen
        # ones too (without state), so it loads; the drop entered again at train start removes them
        if not self.full_groups:
            return
        checkpoint["optimizer_states"] = [
            _with_every_parameter(state, full, opt.param_groups)
            for state, full, opt in zip(checkpoint["optimizer_states"], self.full_groups, trainer.optimizers)
        ]

    def state_dict(self) -> dict[str, Any]:
        if self.dropper is None:
            return {}
        return {
            "dropper": self.dropper.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = state_dict or None

    # ---- inside ------------------------------------------------------------------------------

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.attr, None)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "attr",
                f"'{self.attr}' is not a module of {type(pl_module).__name__}; name the "
                "attribute that holds the CNN (LayerDropping(attr=...))",
            )
        return model

    @staticmethod
    def _val_loader(trainer: pl.Trainer) -> Any:
        if trainer.val_dataloaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loader = trainer.val_dataloaders
        if loader is None or isinstance(loader, (list, tuple, dict)):
            raise ConfigError(
                "val_dataloaders", "LayerDropping needs one validation DataLoader of (image, label)"
            )
        return loader

    def _train_from_feed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The cut moved: the module's forward is the suffix's, batches come from the Dropper's
        feed, and under DDP the trained parameters are wrapped again."""
        dropper = self.dropper
        model = self._model(pl_module)
        suffix = dropper.net
        model.forward = lambda x: suffix(x)  # an instance attribute: state_dict and names stay the model's
        train, val = _FeedLoader(dropper, "train", trainer), _FeedLoader(dropper, "val", trainer)
        _replace_loader(trainer.fit_loop, train)
        trainer.fit_loop.max_batches = len(train)
        if isinstance(trainer.val_check_interval, float):
            trainer.val_check_batch = max(1, int(len(train) * trainer.val_check_interval))
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        if val_loop._combined_loader is not None:
            val_loop._combined_loader.flattened = [val]
            val_loop._max_batches = [len(val)]
        strategy = trainer.strategy
        if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
            strategy.model = strategy._setup_model(pl_module)


class _FeedLoader:
    """The Dropper's feed as a loader a Trainer iterates: each pass asks the feed of the moment."""

    def __init__(self, dropper: Dropper, split: str, trainer: pl.Trainer) -> None:
        self.dropper, self.split, self.trainer = dropper, split, trainer
        if split == "train":
            self.length = dropper.steps_per_epoch
        else:
            self.length = math.ceil(len(dropper.images.indices["val"]) / dropper.b.eval_batch_size)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        feed = self.dropper.feed
        if self.split == "val":
            return feed.val_batches()
        epoch = self.trainer.current_epoch
        order = epoch_order(len(self.dropper.images.indices["train"]), self.dropper.cfg.seed, epoch)
        return feed.train_batches(order, epoch)


def _replace_loader(fit_loop: Any, loader: _FeedLoader) -> None:
    """Train from `loader` from the next batch the fit loop fetches on (its epoch starts after the
    hook that called this)."""
    combined = fit_loop._combined_loader
    combined.flattened = [loader]
    combined.limits = [len(loader)]
    fit_loop._data_fetcher.setup(combined)
    iter(fit_loop._data_fetcher)


def _with_every_parameter(
    state: dict[str, Any], full: list[list[nn.Parameter]], groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """An optimizer's `state_dict()` whose param groups name every parameter of `full` (the groups
    before any drop), the frozen ones without state. The state's parameter ids are positions in
    the groups taken in order, so they are renumbered."""
    current = [p for g in groups for p in g["params"]]  # position = the id in `state`
    position = {id(p): i for i, p in enumerate(current)}
    out_groups, out_state, new_id = [], {}, 0
    for saved, params in zip(state["param_groups"], full):
        ids = []
        for p in params:
            old = position.get(id(p))
            if old is not None and old in state["state"]:
                out_state[new_id] = state["state"][old]
            ids.append(new_id)
            new_id += 1
        out_groups.append(saved | {"params": ids})
    return {"state": out_state, "param_groups": out_groups}
