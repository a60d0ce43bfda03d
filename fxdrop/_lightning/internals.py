"""The Lightning internals `LayerDropping`'s loader swap needs: this module only, with the
Lightning versions it is tested on."""

from __future__ import annotations

from typing import Any

import lightning
import lightning.pytorch as pl
from torch import nn

from ..errors import FxdropError

LIGHTNING_TESTED = "2.6"  # the Lightning versions whose internals `_Loops` is tested on


class LightningInternalsError(FxdropError):
    """This Lightning lacks an internal the loader swap of `LayerDropping` needs."""


class _Loops:
    """Points the Trainer's fit and validation loops at other loaders, and back.

    Lightning offers no public way to change a running fit's loaders from a callback
    (`reload_dataloaders_every_n_epochs` reloads before `on_train_epoch_start`, from the same
    source). A loop builds its loaders from its `_data_source` whenever its `_combined_loader` is
    None; a swap sets these two private attributes and lets the loop's own `setup_data()` do the
    rest (limits, the fetcher, `val_check_batch`), as a reload would. Under DDP the model is
    wrapped again through the strategy's public `model` and `configure_ddp()`.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        fit_loop = trainer.fit_loop
        self.loops = [fit_loop, getattr(fit_loop.epoch_loop, "val_loop", None)]
        for name, loop in zip(("fit_loop", "fit_loop.epoch_loop.val_loop"), self.loops):
            self._need(loop, name)
            self._need(loop._data_source, f"{name}._data_source", "instance")
        ddp = isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel)
        if ddp and not callable(getattr(trainer.strategy, "configure_ddp", None)):
            self._missing(f"{type(trainer.strategy).__name__}.configure_ddp")
        self.own: list[tuple[Any, Any]] = []  # each loop's source and loaders, before the first swap

    def users(self) -> tuple[Any, Any]:
        """The user's training and validation loaders (validation set up if it is not yet)."""
        if self.loops[1]._combined_loader is None:
            self.loops[1].setup_data()
        return self.trainer.train_dataloader, self.trainer.val_dataloaders

    def _need(self, obj: Any, name: str, *attrs: str) -> None:
        for attr in attrs or ("_data_source", "_combined_loader", "setup_data"):
            if obj is None or not hasattr(obj, attr):
                self._missing(f"{name}.{attr}" if obj is not None else name)

    @staticmethod
    def _missing(what: str) -> None:
        raise LightningInternalsError(
            f"LayerDropping swaps the Trainer's loaders through Lightning internals tested on Lightning "
            f"{LIGHTNING_TESTED}, and Lightning {lightning.__version__} has no `{what}`: install "
            f"lightning~={LIGHTNING_TESTED}.0 or report this at fxdrop's issues"
        )

    def swap(self, train: Any, val: Any) -> None:
        """Train and validate from `train` and `val` from the next batch on."""
        if not self.own:
            self.own = [(loop._data_source.instance, loop._combined_loader) for loop in self.loops]
        for loop, loader in zip(self.loops, (train, val)):
            loop._data_source.instance, loop._combined_loader = loader, None
            loop.setup_data()

    def restore(self) -> None:
        """The loops' own loaders again, as they were before the first swap."""
        for loop, (source, combined) in zip(self.loops, self.own):
            loop._data_source.instance, loop._combined_loader = source, combined
        self.own = []

    def wrap_ddp_again(self, pl_module: pl.LightningModule) -> None:
        """DDP around what trains now, so the frozen parameters are not waited for."""
        strategy = self.trainer.strategy
        if isinstance(strategy.model, nn.parallel.DistributedDataParallel):
            strategy.model = pl_module
            strategy.configure_ddp()
