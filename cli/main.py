"""`fxdrop`: each command parses its options, calls one library function, and renders the result."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

import fxdrop
from fxdrop.config import FitConfig
from fxdrop.data import export_fashion_mnist
from fxdrop.data.file_facts import clear_file_facts
from fxdrop.finetuning import finetune as run_finetune
from fxdrop.inspection import inspect_model
from fxdrop.models import model_family
from fxdrop.policies import parse_policy

from . import options as opt
from . import render
from .flags import Failed, namer, names
from .options import LIMIT_VAL, MODEL_HELP
from .progress import _main_rank, _Progress, _progress, _Terminated  # noqa: F401 (tests reach _Progress here)
from .screen import console, err_console
from .sizes import mib as _mib
from .sizes import size_in_bytes


class _Group(typer.core.TyperGroup):
    """Its --help and its commands' are switches: the help shows no `<bool>` value after them."""

    def get_help_option(self, ctx: typer.Context) -> typer.core.TyperOption | None:
        return _switch(super().get_help_option(ctx))

    def get_command(self, ctx: typer.Context, name: str) -> typer.core.TyperCommand | _Group | None:
        command = super().get_command(ctx, name)
        if command is not None:
            _switch(command.get_help_option(ctx))
        return command


class _Command(typer.core.TyperCommand):
    """A command whose library errors name its own flags: the error's message carries the
    parameters it names (fxdrop.messages), written here from this command's options."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except fxdrop.FxdropError as exc:
            raise Failed(exc.message.render(namer(self, ctx.find_root().command))) from exc


def _switch(option: typer.core.TyperOption | None) -> typer.core.TyperOption | None:
    if option is not None:
        option.metavar = ""  # typer would show `<bool>`
    return option


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train CNNs faster by dropping the layers that have stopped learning (Learn&Drop on torch.fx).",
)


def _version(asked: bool) -> None:
    if asked:
        console.print(f"fxdrop {fxdrop.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        metavar="",
        is_eager=True,
        callback=_version,
        help="print fxdrop's version and exit",
    ),
) -> None:
    """fxdrop: Learn&Drop layer dropping for any timm/torchvision CNN or nn.Module."""


@app.command(cls=_Command)
def inspect(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    img_size: Optional[int] = typer.Option(None, help="input size in pixels", show_default="the model's own"),
    as_json: bool = typer.Option(
        False, "--json", metavar="", help="print a JSON object: the sizes, the timings and one row per cut"
    ),
    cost: bool = typer.Option(
        False,
        "--cost",
        metavar="",
        help="time training steps here and predict the step, and when a cache pays, at each cut",
    ),
    device: Optional[str] = typer.Option(
        None, help="device for --cost", show_default="cuda if available, else cpu"
    ),
    batch_size: int = typer.Option(64, help="batch size for --cost"),
    tier: Optional[str] = typer.Option(
        None,
        help="cache tier for --cost: device | pinned | memory | disk",
        show_default="the fastest that fits",
    ),
    images: int = typer.Option(10_000, help="training images per epoch, for --cost's 'pays after'"),
) -> None:
    """List a model's cut points (one per set of frozen parameters), and with --cost their step time.

    For each: the activation's size, the prefix's FLOPs, the parameters left to train, and with
    --cost the predicted step from a cache and freeze-only, and after how many epochs a cache pays.
    """
    report = inspect_model(
        model, img_size, cost=cost, device=device, batch_size=batch_size, tier=tier, images=images
    )
    if report.warning:
        err_console.print(
            f"[yellow]warning:[/yellow] {report.warning.render(names(ctx))}",
            highlight=False,
            soft_wrap=True,
        )
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    console.print(render.cut_table(report))
    if report.cost:
        c = report.cost
        console.print(
            f"full model step: {1e3 * c.step_s(-1):.2f} ms at batch {c.batch_size} (every segment's forward "
            f"and backward, timed); cached activations read from the {report.tier} tier at "
            f"{c.bandwidth(0) / 1e9:.2f} GB/s, written at {c.write_bytes_per_s / 1e9:.2f} GB/s",
            highlight=False,
        )


data_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Data sources: export the built-in ones as image folders."
)
app.add_typer(data_app, name="data")


@data_app.command("export", cls=_Command)
def data_export(
    source: str = typer.Argument(..., help="built-in source: fashion-mnist"),
    out_dir: Path = typer.Argument(..., help="folder to write train/<class>/*.png and val/<class>/*.png"),
    limit: Optional[int] = typer.Option(
        None, help=f"class-balanced subsets: N training images and {LIMIT_VAL} validation images"
    ),
) -> None:
    """Write a built-in data source as an ImageFolder tree (the layout `--data DIR` reads)."""
    if source != "fashion-mnist":
        raise fxdrop.DataError(f"unknown built-in data source '{source}'; available: fashion-mnist")
    written = export_fashion_mnist(str(out_dir), limit=limit)
    console.print(
        f"wrote {written.train:,} training and {written.val:,} validation images of "
        f"{len(written.per_class['train'])} classes to [bold]{out_dir}[/bold] "
        f"(train/<class>/*.png, val/<class>/*.png); use it with --data {out_dir}"
    )


@app.command("clean-cache", cls=_Command)
def clean_cache() -> None:
    """Forget the image files' hashes fxdrop remembers between runs (runs' activation caches stay)."""
    cleared = clear_file_facts()
    console.print(f"removed {cleared.files} file-facts memo(s), {_mib(cleared.bytes)}, from {cleared.folder}")


@app.command(cls=_Command)
def finetune(
    ctx: typer.Context,
    model: opt.Model,
    data: opt.Data = ...,
    img_size: opt.ImgSize = None,
    limit: opt.Limit = None,
    num_workers: opt.NumWorkers = FitConfig.num_workers,
    pretrained: opt.Pretrained = None,
    weights: opt.Weights = None,
    compile: opt.Compile = False,
    epochs: opt.Epochs = FitConfig.epochs,
    batch_size: opt.BatchSize = FitConfig.batch_size,
    lr: opt.Lr = FitConfig.lr,
    optimizer: opt.Optimizer = FitConfig.optimizer,
    momentum: opt.Momentum = FitConfig.momentum,
    weight_decay: opt.WeightDecay = FitConfig.weight_decay,
    warmup_epochs: opt.WarmupEpochs = FitConfig.warmup_epochs,
    label_smoothing: opt.LabelSmoothing = FitConfig.label_smoothing,
    amp: opt.Amp = None,
    device: opt.Device = None,
    seed: opt.Seed = FitConfig.seed,
    clip_grad: opt.ClipGrad = FitConfig.clip_grad,
    clip_mode: opt.ClipMode = FitConfig.clip_mode,
    grad_accum_steps: opt.GradAccumSteps = FitConfig.grad_accum_steps,
    model_ema: opt.ModelEma = FitConfig.model_ema,
    model_ema_decay: opt.ModelEmaDecay = FitConfig.model_ema_decay,
    model_ema_eval: opt.ModelEmaEval = FitConfig.model_ema_eval,
    mixup: opt.Mixup = FitConfig.mixup,
    cutmix: opt.Cutmix = FitConfig.cutmix,
    cutmix_minmax: opt.CutmixMinmax = FitConfig.cutmix_minmax,
    mixup_prob: opt.MixupProb = FitConfig.mixup_prob,
    mixup_switch_prob: opt.MixupSwitchProb = FitConfig.mixup_switch_prob,
    mixup_mode: opt.MixupMode = FitConfig.mixup_mode,
    mix_after_drop: opt.MixAfterDrop = FitConfig.mix_after_drop,
    patience: opt.Patience = FitConfig.patience,
    policy: opt.Policy = "learn-drop",
    landing: opt.Landing = FitConfig.landing,
    cache_dir: opt.CacheDir = None,
    cache_dtype: opt.CacheDtype = FitConfig.cache_dtype,
    cache_memory: opt.CacheMemory = None,
    cache_views: opt.CacheViews = FitConfig.cache_views,
    keep_cache: opt.KeepCache = FitConfig.keep_cache,
    out: opt.Out = ...,
    resume: opt.Resume = False,
    overwrite: opt.Overwrite = False,
    log_tensorboard: opt.LogTensorboard = FitConfig.log_tensorboard,
) -> None:
    """Fine-tune MODEL on real images, dropping the layers that have stopped learning."""
    args = _finetune_args(ctx.params)
    with _progress(args["epochs"], args["limit"], names(ctx)) as shown:
        result = run_finetune(model, data, out, on_event=shown, **args)
    if _main_rank():
        console.print(render.finetune_summary(model, out, result))
        _after(result, out, args["keep_cache"])


def _finetune_args(options: dict[str, Any]) -> dict[str, Any]:
    """The library's `finetune` arguments from the command's options, which are named as the
    library names them: a few are converted, the rest (FitConfig fields and `finetune`'s own)
    pass on as they are."""
    args = {k: v for k, v in options.items() if k not in ("model", "data", "out")}
    pretrained = args["pretrained"]
    if pretrained is None:  # auto: the hub's weights for a hub's model
        pretrained = model_family(options["model"])[0] != "file"
    return args | {
        "policy": parse_policy(args["policy"]),
        "pretrained": pretrained and args["weights"] is None,
        "weights": str(args["weights"]) if args["weights"] else None,
        "cache_dir": str(args["cache_dir"]) if args["cache_dir"] else None,
        "cache_memory": size_in_bytes(args["cache_memory"], "cache_memory") if args["cache_memory"] else None,
        "compile": "inductor" if args["compile"] else None,
    }


def _after(result: fxdrop.FitResult, out: Path, keep_cache: bool) -> None:
    """What a finished run or update left on disk, and where to look next."""
    if result.cut >= 0 and keep_cache and result.cache_bytes:
        console.print(
            f"kept the activation cache ({_mib(result.cache_bytes)} on disk) for `fxdrop update`; "
            "--no-keep-cache removes it at the end"
        )
    console.print(f"the run's story: fxdrop report {out}")


@app.command(cls=_Command)
def update(
    ctx: typer.Context,
    out: Path = typer.Argument(..., help="the folder of a finished `fxdrop finetune` run"),
    data: str = typer.Option(
        ..., "--data", "-d", help="a folder with train/<class>/* and val/<class>/*, the run's classes"
    ),
    epochs: int = typer.Option(2, "--epochs", "-e", help="epochs to train on the data"),
    replay: str = typer.Option(
        "all", help="all: train on every image; new: only on images the run never saw"
    ),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: the run's)"),
    limit: Optional[int] = typer.Option(
        None, help=f"use class-balanced subsets: N training images and {LIMIT_VAL} validation images"
    ),
    keep_cache: bool = typer.Option(
        FitConfig.keep_cache, metavar="", help="keep the activation cache for the next update"
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: the run's)"),
    num_workers: Optional[int] = typer.Option(
        None, "--workers", "-j", help="DataLoader worker processes (default: the run's)"
    ),
    resume: bool = typer.Option(
        False, "--resume", metavar="", help="finish an update of OUT that was interrupted"
    ),
    model_file: Optional[str] = typer.Option(
        None,
        help="for a run made from a Python file: its spec (path.py:FACTORY) named again, after checking "
        "the file (fxdrop imports no code a run folder names)",
    ),
) -> None:
    """Continue a finished run on new or changed images: only what is new goes through the frozen prefix."""
    overrides = {
        k: v for k, v in {"lr": lr, "device": device, "num_workers": num_workers}.items() if v is not None
    }
    with _progress(epochs, limit, names(ctx)) as shown:
        result = fxdrop.update_folder(
            out,
            data,
            limit=limit,
            epochs=epochs,
            replay=replay,
            resume=resume,
            on_event=shown,
            keep_cache=keep_cache,
            model_file=model_file,
            **overrides,
        )
    if _main_rank():
        console.print(render.update_summary(out, result))
        _after(result, out, keep_cache)


@app.command(cls=_Command)
def report(
    out: Path = typer.Argument(..., help="a run's folder (made by finetune, with or without updates)"),
    png: Optional[Path] = typer.Option(None, help="where to write the picture (default: OUT/report.png)"),
) -> None:
    """A run's story: accuracy, step time and the cut against wall-clock, drops and updates marked."""
    story = fxdrop.run_report(out)
    picture = fxdrop.plot_report(story, png or out / "report.png")
    console.print(render.story_table(out, story))
    for line in render.story_lines(story):
        console.print(line)
    console.print(f"picture: {picture}")


def _terminated(signum, frame) -> None:
    raise _Terminated(signum)


def main() -> None:
    """Entry point: user errors become one red line and exit code 1 (traceback with FXDROP_DEBUG=1);
    Ctrl-C is one line and exit code 130."""
    debug = os.environ.get("FXDROP_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)
    try:
        app()
    except (fxdrop.FxdropError, Failed) as exc:  # Failed: raised in a command, named as it names them
        if debug:
            raise
        line = exc.line if isinstance(exc, Failed) else str(exc)
        err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, _Terminated) as exc:
        if debug:
            raise
        err_console.print(
            exc.line if isinstance(exc, _Terminated) else "interrupted",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(exc.code if isinstance(exc, _Terminated) else 130)


if __name__ == "__main__":
    main()
