"""fxdrop inside PyTorch Lightning: `LayerDropping`, a callback that drives the same Dropper `fit`
drives.

    trainer = Trainer(max_epochs=20, callbacks=[LayerDropping(attr="model")])
    trainer.fit(module, train_loader, val_loader)

Until the first drop the Trainer runs as the user wrote it. At the start of an epoch the policy
may drop the front of `module.<attr>`: its frozen parameters leave the optimizers (every other
parameter keeps its state, groups and schedule), the prefix's activations are cached, and from
then on the training and validation batches come from the cache, in the structure of the user's
batches (an `(image, label)` pair or a dict), the activations where the images were; `module.<attr>`
(its forward now the suffix's) takes them as it took images. Under DDP the trained module is
wrapped again so the frozen parameters are not waited for. Checkpoints hold the model's weights
under their original names and an optimizer state any fresh optimizer of the module loads; the
callback's own state (cut, policy, records; plain tensors and primitives) resumes the drop.

When `fit` ends, and when it raises, everything the callback changed on the user's objects is
put back: `module.<attr>` is the whole model (its forward, `requires_grad` and modes as before
`fit`), the optimizers hold every parameter again, and the Trainer's loops their own loaders.

Requires `pip install fxdrop[lightning]`. Drops are decided at epoch starts (a Trainer fetches a
batch ahead, so a drop inside an epoch would hand the new suffix a batch made for the old module).
Before a segment freezes it lands (`landing` epochs, as in `fit`): `on_before_optimizer_step`
saves the landing parameters and `on_train_batch_end` moves them by their share of the step; a
landing that ends inside an epoch leaves its segment at zero rate until the next epoch start.
The Lightning internals the loader swap needs sit in one module, `_lightning/internals.py`
(`_Loops`); the callback's other pieces beside it in `fxdrop/_lightning/`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("fxdrop.lightning needs PyTorch Lightning: pip install 'fxdrop[lightning]'") from exc

from . import distributed as D
from ._lightning.batches import _BatchShape, _FeedLoader
from ._lightning.changes import _Found, _SuffixForward, _with_every_parameter
from ._lightning.internals import LightningInternalsError, _Loops
from ._lightning.rates_ahead import _lr_left, _schedule
from .config import FitConfig
from .engine.dropper import Dropper, StretchTime
from .engine.setup import set_up
from .errors import ConfigError
from .policies import LearnDrop, Policy
from .records import Epoch, emitter

__all__ = ["LayerDropping", "LightningInternalsError"]

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
    "landing",
    "seed",
)
# fit's mixing settings, refused by name: a Trainer's loss is the user's, which fxdrop cannot make
# soft-target (engine/mixing.py)
MIXING = (
    "mixup",
    "cutmix",
    "cutmix_minmax",
    "mixup_prob",
    "mixup_switch_prob",
    "mixup_mode",
    "mix_after_drop",
)
# fit's recipe settings a Trainer has its own way to give, refused with that way
TRAINERS_OWN = {
    "grad_accum_steps": "Trainer(accumulate_grad_batches=N) (the callback counts its optimizer steps)",
    "model_ema": "Lightning's WeightAveraging callback, or timm's ModelEmaV3 in your LightningModule",
    "model_ema_decay": "Lightning's WeightAveraging callback, or timm's ModelEmaV3 in your LightningModule",
    "model_ema_eval": "Lightning's WeightAveraging callback, or timm's ModelEmaV3 in your LightningModule",
    "log_tensorboard": "Trainer(logger=TensorBoardLogger(...)), Lightning's own",
}


class LayerDropping(pl.Callback):
    """Drop the settled front of `pl_module.<attr>` during `trainer.fit` and train the rest from
    cached activations.

    Args:
        attr: the attribute of the LightningModule that holds the CNN (called as `attr(x)` in its
            `training_step` and `validation_step`).
        policy: when to drop (default: :class:`fxdrop.LearnDrop`).
        monitor: the logged validation accuracy (in `trainer.callback_metrics`) that judges
            whether a drop hurt; absent: not judged.
        batch_keys: where a sample of the loaders' datasets keeps its image and its label:
            `(image_key, label_key)` of a dict sample, or positions in a pair. None: `(0, 1)` for
            pairs; for dicts the first present of image, img, pixel_values, input, x and of
            label, labels, target, y.
        **options: fit's settings: cache, cache_dir, cache_dtype, cache_views, cache_tier,
            cache_memory, keep_cache, cost_model, landing, seed. `landing` (epochs, 1; 0: at once):
            before a segment freezes its learning rate anneals to zero, as in `fit`; a landing
            that ends inside an epoch leaves the segment at zero until the next epoch start,
            where the drop happens.

    Example:
        >>> dropping = LayerDropping(attr="model", batch_keys=("image", "label"), cache_dtype="bf16")
        >>> Trainer(max_epochs=20, callbacks=[dropping]).fit(module, train_loader, val_loader)
    """

    def __init__(
        self,
        attr: str = "model",
        policy: Policy | None = None,
        monitor: str = "val_acc",
        batch_keys: tuple[str | int, str | int] | None = None,
        **options: Any,
    ) -> None:
        for name in options:
            if name in MIXING:
                raise ConfigError(
                    name,
                    "is fit's: inside a Trainer the loss is your training_step's, so mix there (timm's "
                    "Mixup and SoftTargetCrossEntropy); after a drop its batches hold the cut's "
                    "activations where the images were",
                )
            if name in TRAINERS_OWN:
                raise ConfigError(name, f"is fit's; in a Trainer use {TRAINERS_OWN[name]}")
            if name not in OPTIONS:
                raise ConfigError(name, f"is not a LayerDropping option; known: {', '.join(OPTIONS)}")
        if batch_keys is not None and (len(batch_keys) != 2 or batch_keys[0] == batch_keys[1]):
            raise ConfigError("batch_keys", "is (image_key, label_key): two different keys")
        FitConfig.from_kwargs(options)  # checked now, not at the first drop
        self.attr, self.policy, self.monitor, self.options = attr, policy or LearnDrop(), monitor, options
        self.batch_keys = batch_keys
        self.dropper: Dropper | None = None
        self.saved: dict[str, Any] | None = None  # the state a checkpoint gave, entered at train start
        self.history: list[Epoch] = []  # one record per epoch, as fit's metrics.json "epochs"
        self.epoch_t0, self.epoch_steps, self.epoch_loss = 0.0, 0, 0.0
        self.step_losses: list[float] = []  # the losses since the last optimizer step
        self.landing_step: list[Any] | None = None  # `Landings.before` of the optimizer step under way
        self.found: _Found | None = None  # what fit changes on the user's objects, as found
        self.loops: _Loops | None = None
        self.loaders: list[_FeedLoader] = []

    # ---- Lightning's hooks -------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dropper = None  # a new fit (a reused callback's last Dropper is closed)
        model = self._model(pl_module)
        self.loops = _Loops(trainer)  # checks the Lightning internals before anything changes
        train_loader, val_loader = self.loops.users()
        if val_loader is None or isinstance(val_loader, (list, tuple, dict)):
            raise ConfigError("val_dataloaders", "LayerDropping needs one validation DataLoader")
        shape = _BatchShape.of(train_loader, "train_dataloader", self.batch_keys)
        if _BatchShape.of(val_loader, "val_dataloaders", self.batch_keys) != shape:
            raise ConfigError(
                "batch_keys", "the training and validation samples differ in structure; make them alike"
            )
        self.found = _Found(model, trainer.optimizers)
        data = {"train": shape.pairs(train_loader.dataset), "val": shape.pairs(val_loader.dataset)}
        info = D.init_distributed(pl_module.device)
        # the Trainer's batches: its loader's size per rank and workers, bf16 as its precision says;
        # the Dropper counts optimizer steps, as the Trainer's global_step does
        batches = {
            "batch_size": train_loader.batch_size * info.world_size,
            "grad_accum_steps": trainer.accumulate_grad_batches,
            "amp": str(trainer.precision).startswith("bf16"),
            "channels_last": False,
            "num_workers": train_loader.num_workers,
        }
        cfg = FitConfig.from_kwargs(self.options | {"epochs": trainer.max_epochs} | batches)
        setup = set_up(model, data, cfg, pl_module.device, info)
        self.dropper = Dropper(model, data, cfg, self.policy, setup, emitter(None), _schedule(trainer))
        self.loaders = [_FeedLoader(self.dropper, split, trainer, shape) for split in ("train", "val")]
        if self.saved is None:
            self.dropper.begin()
            return
        self.history = [Epoch.from_json(h) for h in self.saved["history"]]
        if self.history:
            self.dropper.note_epoch(self.history[-1])
        self.dropper.load_state_dict(self.saved["dropper"], trainer.global_step, trainer.optimizers)
        self.saved = None
        if self.dropper.cut >= 0:
            self._train_from_feed(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        drop = self.dropper.decide(
            epoch, trainer.max_epochs, trainer.global_step, trainer.optimizers, lr_left=_lr_left(trainer)
        )
        if drop is not None:
            self._train_from_feed(trainer, pl_module)
        self.dropper.epoch_start()
        self.epoch_t0, self.epoch_steps, self.epoch_loss = time.perf_counter(), 0, 0.0
        self.step_losses = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # after the backward of a real optimizer step (accumulated batches call no hook), before the
        # step: the landing parameters as they are now
        if self.landing_step is not None:  # a second optimizer step in one batch (manual optimization)
            self.dropper.landings.after(self.landing_step)
        self.landing_step = self.dropper.landings.before(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        landing_step, self.landing_step = self.landing_step, None
        if landing_step is not None:  # an optimizer step was taken: it lands at the landing's rate
            self.dropper.landings.after(landing_step)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:  # else the step was skipped (training_step returned None)
            loss = float(loss) * trainer.accumulate_grad_batches  # Lightning's is divided for accumulation
            self.epoch_steps, self.epoch_loss = self.epoch_steps + 1, self.epoch_loss + loss
            self.step_losses.append(loss)
        if landing_step is not None and self.step_losses:
            loss, self.step_losses = sum(self.step_losses) / len(self.step_losses), []
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.dropper.stepped(loss, lr)  # it counts optimizer steps, as global_step does

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dropper, epoch = self.dropper, trainer.current_epoch
        seconds = time.perf_counter() - self.epoch_t0
        # the epoch is one stretch: drops come at epoch starts; the batches are the Trainer's
        stretch = StretchTime(dropper.cut, dropper.feed.cached, self.epoch_steps, seconds)
        dropper.timed(dropper.cut, seconds / max(self.epoch_steps, 1), 0.0)
        acc = trainer.callback_metrics.get(self.monitor)
        record = dropper.records.epoch(
            epoch,
            dropper.cut,
            [stretch],
            self.epoch_loss / max(self.epoch_steps, 1),  # this rank's mean over the epoch's steps
            seconds,
            (float(acc) if acc is not None else None, None),
            seconds,
            trainer.optimizers[0].param_groups[0]["lr"],
        )
        dropper.epoch_end(epoch, record, self.history)
        self.history.append(record)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._put_back(trainer, pl_module, keep_cache=None)  # as its `keep_cache` says

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # a cache in the user's cache_dir stays for a resumed fit to reopen, as fit's own does
        self._put_back(trainer, pl_module, keep_cache=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a fresh optimizer of the module holds every parameter: the saved state names the frozen
        # ones too (without state), so it loads; the drop entered again at train start removes them
        if self.found is None:  # not fitting, or put back: the optimizers hold every parameter
            return
        checkpoint["optimizer_states"] = [
            _with_every_parameter(state, full, opt.param_groups)
            for state, (opt, full) in zip(checkpoint["optimizer_states"], self.found.groups)
        ]

    def state_dict(self) -> dict[str, Any]:
        if self.dropper is None:
            return {}
        # checkpoints are loaded with weights_only: plain data only
        return _plain({"dropper": self.dropper.state_dict(), "history": [h.to_json() for h in self.history]})

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

    def _train_from_feed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The cut moved: the module's forward is the suffix's, batches come from the Dropper's
        feed, and under DDP the trained parameters are wrapped again."""
        model = self._model(pl_module)
        # an instance attribute: state_dict and names stay the model's
        model.forward = _SuffixForward(model, self.dropper.net)
        train, val = self.loaders
        self.loops.swap(train, val)
        self.loops.wrap_ddp_again(pl_module)

    def _put_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, keep_cache: bool | None) -> None:
        """Undo what the fit changed on the user's objects (every exit: the end, an exception); the
        cache stays if `keep_cache` (None: as the `keep_cache` option says)."""
        self.landing_step = None
        if self.found is None:  # nothing changed yet (a check at train start failed), or put back
            return
        for loader in self.loaders:
            loader.close()  # a disk tier's read-ahead stops before its files may go
        self.loops.restore()
        self.found.restore()
        self.found, self.loops, self.loaders = None, None, []
        if self.dropper is not None:
            self.dropper.close(keep_cache=keep_cache)


# ---- checkpoints -------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """`value` as plain data a weights_only load reads: dicts, lists, tuples, str, int, float,
    bool, None and tensors (numpy scalars and arrays become Python numbers and tensors)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if type(value).__module__ == "numpy":
        return value.item() if value.ndim == 0 else torch.from_numpy(value)
    raise TypeError(f"LayerDropping's checkpoint state holds a {type(value).__name__}")  # a bug of ours
