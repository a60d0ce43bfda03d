"""What a training command shows while it runs: bars for epochs, steps and cache building, a
line per drop, and what an interrupt kept."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import ClassVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fxdrop.messages import Message, Ref, api_name
from fxdrop.records import (
    CacheBuild,
    CacheGone,
    CacheProgress,
    CacheRebuilt,
    Checkpoint,
    DataSummary,
    Drop,
    Epoch,
    EpochStart,
    ImgSize,
    Landing,
    LandingCancelled,
    NoDrop,
    NoResume,
    Record,
    Step,
    StoppedEarly,
    ValAtChance,
    Weights,
)

from .screen import console
from .sizes import mib as _mib


class _Terminated(BaseException):
    """SIGTERM or SIGINT, raised in the main thread so that writes in progress clean up; not a
    KeyboardInterrupt, which typer would turn into a silent exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM
        self.line = "interrupted"  # a training command's progress says what was kept


class _Progress:
    """Renders fit's events: progress bars for epochs, steps and cache building; a line per drop.
    The bars appear with the first epoch, so an error found before it is the only thing shown."""

    def __init__(self, epochs: int, limit: int | None = None, name: Callable[[Ref], str] = api_name) -> None:
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self.p = Progress(*columns, console=console, transient=False)
        self.total = epochs
        self.limit = limit  # --limit, which subsets both splits
        self.name = name  # how a message's parameters are named: the command's flags (flags.names)
        self.epochs: TaskID | None = None
        self.steps: TaskID | None = None
        self.cache: TaskID | None = None
        self.kept: int | None = None  # the last epoch checkpointed; None: training has not begun

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if self.epochs is not None:
            self.p.stop()
        if isinstance(exc, _Terminated):
            exc.line = self.interrupted()

    def interrupted(self) -> str:
        """The line an interrupt ends with: what it kept, truly."""
        if self.kept is None:
            return "interrupted before training began"
        if self.kept == 0:
            return "interrupted before the first epoch finished: no epoch is kept; rerun the command"
        return f"interrupted; epoch {self.kept} of {self.total} is kept: rerun with --resume to continue"

    def _bars(self, epochs_done: int) -> None:
        if self.epochs is None:
            self.p.start()
            self.epochs = self.p.add_task("epochs", total=self.total, completed=epochs_done)
            self.steps = self.p.add_task("steps", total=1)

    def _close_cache_bar(self) -> None:
        if self.cache is not None:
            self.p.remove_task(self.cache)
            self.cache = None

    def _say(self, line: str) -> None:
        self.p.console.print(line, highlight=False, soft_wrap=True)

    def __call__(self, kind: str, record: Record) -> None:
        """`on_event`: shows `record` as its type is shown (`kind` is `record.kind`); a record
        with no line of its own (a declined drop) shows nothing."""
        show = self._SHOWS.get(type(record))
        if show is not None:
            show(self, record)

    def _img_size(self, e: ImgSize) -> None:
        if e.why != "asked for":
            self._say(f"image size {e.img_size} px: {e.why} (--img-size to choose)")
        if e.warning:
            warning = e.warning.render(self.name) if isinstance(e.warning, Message) else e.warning
            self._say(f"[yellow]warning:[/yellow] {warning}")

    def _weights(self, e: Weights) -> None:
        self._say(e.line)

    def _data(self, e: DataSummary) -> None:
        skipped = f"; skipped {e.skipped} unreadable image(s)" if e.skipped else ""
        subset = f" (--limit {self.limit}: class-balanced subsets of both)" if self.limit is not None else ""
        self._say(
            f"data {e.source}: {e.train} training and {e.val} validation "
            f"images{subset}, {e.classes} classes{skipped}"
        )

    def _cache_rebuilt(self, e: CacheRebuilt) -> None:
        self._say(
            f"[yellow]cache rebuilt:[/yellow] {e.folder}/{e.file} failed its {e.check} "
            f"check ({e.detail}); rebuilt it ({e.samples} samples)"
        )

    def _cache_gone(self, e: CacheGone) -> None:
        self._say(f"the run's cache is gone; rebuilt it at cut {e.cut} from the images ({e.samples} samples)")

    def _epoch_start(self, e: EpochStart) -> None:
        self._bars(e.epoch - 1)
        self.kept = max(self.kept or 0, e.epoch - 1)
        cut = "full model" if e.cut < 0 else f"suffix after cut {e.cut}"
        self.p.reset(self.steps, total=e.steps, description=f"epoch {e.epoch} ({cut})")

    def _step(self, e: Step) -> None:
        self.p.update(self.steps, completed=e.step, description=f"epoch {e.epoch} loss {e.loss:.3f}")

    def _caching(self, e: CacheProgress) -> None:
        desc = f"caching {e.split} view {e.view}"
        if self.cache is None:
            self.cache = self.p.add_task(desc, total=e.total)
        self.p.update(self.cache, completed=e.done, total=e.total, description=desc)

    def _drop(self, e: Drop) -> None:
        self._close_cache_bar()
        fmt = f" ({e.cache_dtype})" if e.cache_dtype else ""
        how = (
            f"cache {_mib(e.cache_bytes)}{fmt} built in {e.cache_seconds:.1f} s"
            if e.cached
            else "freeze-only (prefix recomputed)"
        )
        self._say(
            f"[bold green]drop[/bold green] epoch {e.epoch}: cut {e.cut} after "
            f"[bold]{e.where}[/bold], {e.frozen_params:,} parameters frozen, {how}"
        )
        if e.cache_dtype_why:
            self._say(f"     cache format {e.cache_dtype_why}")
        if e.predicted_steps is not None:
            before, after = e.predicted_steps
            self._say(f"     predicted step {1e3 * before:.0f} -> {1e3 * after:.0f} ms")

    def _cached(self, e: CacheBuild) -> None:
        self._close_cache_bar()
        self._say(
            f"[bold green]cache[/bold green] epoch {e.epoch}: built the activations at cut {e.cut} "
            f"({e.where}), {_mib(e.cache_bytes)} in {e.cache_seconds:.1f} s: "
            "freeze-only there had cost as much"
        )
        if e.cache_dtype_why:
            self._say(f"     cache format {e.cache_dtype_why}")

    def _landing(self, e: Landing) -> None:
        self._say(
            f"[bold cyan]landing[/bold cyan] epoch {e.epoch}: {', '.join(e.modules)} "
            f"anneal to zero learning rate by step {e.ends_at_step}, then freeze"
        )

    def _landing_cancelled(self, e: LandingCancelled) -> None:
        self._say(f"landing cancelled epoch {e.epoch}: {', '.join(e.modules)} learn again")

    def _checkpoint(self, e: Checkpoint) -> None:
        self.kept = e.epoch

    def _no_resume(self, e: NoResume) -> None:
        self._say(f"[yellow]{e.reason}[/yellow]")

    def _stopped_early(self, e: StoppedEarly) -> None:
        self._say(f"[yellow]stopped early[/yellow] after epoch {e.after_epoch}: {e.reason}")

    def _val_at_chance(self, e: ValAtChance) -> None:
        self._say(f"[yellow]warning:[/yellow] {e.why}")

    def _no_drop(self, e: NoDrop) -> None:
        further = " further" if e.cut >= 0 else ""  # an update, at its run's cut
        self._say(f"no{further} drop: {e.reason}")

    def _epoch_end(self, e: Epoch) -> None:
        self.p.advance(self.epochs)
        acc = "-" if e.val_acc is None else f"{100 * e.val_acc:.2f}%"
        self._say(
            f"epoch {e.epoch}: loss {e.train_loss:.4f}  val acc {acc}  "
            f"{e.seconds:.1f}s  forward FLOPs {100 * e.forward_flops_fraction:.1f}%"
        )

    # how each record is shown
    _SHOWS: ClassVar[dict[type[Record], Callable[..., None]]] = {
        ImgSize: _img_size,
        Weights: _weights,
        DataSummary: _data,
        CacheRebuilt: _cache_rebuilt,
        CacheGone: _cache_gone,
        EpochStart: _epoch_start,
        Step: _step,
        CacheProgress: _caching,
        Drop: _drop,
        CacheBuild: _cached,
        Landing: _landing,
        LandingCancelled: _landing_cancelled,
        Checkpoint: _checkpoint,
        NoResume: _no_resume,
        StoppedEarly: _stopped_early,
        ValAtChance: _val_at_chance,
        NoDrop: _no_drop,
        Epoch: _epoch_end,
    }


def _progress(
    epochs: int, limit: int | None, name: Callable[[Ref], str]
) -> _Progress | contextlib.nullcontext:
    """The screen's progress; under torchrun, ranks other than 0 show nothing (`on_event` None)."""
    return _Progress(epochs, limit, name) if _main_rank() else contextlib.nullcontext()


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
