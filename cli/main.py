"""`fxdrop`: each command parses its options, calls one library function, and renders the result."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional, Tuple

import typer
import typer.core
from rich import box
from rich.table import Table

import fxdrop
from fxdrop.config import FitConfig
from fxdrop.data import export_fashion_mnist
from fxdrop.data.file_facts import clear_file_facts
from fxdrop.finetuning import finetune as run_finetune
from fxdrop.inspection import ModelReport as InspectReport
from fxdrop.inspection import inspect_model
from fxdrop.models import model_family
from fxdrop.policies import parse_policy

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

_MODEL_HELP = "timm:NAME, torchvision:NAME, path/to/file.py:FACTORY, or a bare timm name (resnet18)"
# finetune's help panels, in the order a run needs them
_DATA, _MODEL, _TRAINING, _DROPPING = "Data", "Model", "Training", "Dropping"
_MIXING = "Mixing (timm's flags)"
_CACHE, _OUTPUT = "Cache", "Output"
_LIMIT_VAL = "max(N/4, classes)"  # the validation subset --limit takes (fxdrop.data.build_data)
_POLICY_HELP = (
    "learn-drop | autofreeze | freezeout[:T0] (FreezeOut: each segment's rate annealed to zero at "
    "its freeze) | freezeout-schedule[:T0] (its schedule only) | none | fixed:CUT@N (CUT from "
    "`fxdrop inspect`; dropped after N epochs, @0: from the start)"
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


@app.command()
def inspect(
    model: str = typer.Argument(..., help=_MODEL_HELP),
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
            f"[yellow]warning:[/yellow] {_as_flags(report.warning, 'inspect')}",
            highlight=False,
            soft_wrap=True,
        )
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    console.print(_cut_table(report))
    if report.cost:
        c = report.cost
        console.print(
            f"full model step: {1e3 * c.step_s(-1):.2f} ms at batch {c.batch_size} (every segment's forward "
            f"and backward, timed); cached activations read from the {report.tier} tier at "
            f"{c.bandwidth(0) / 1e9:.2f} GB/s, written at {c.write_bytes_per_s / 1e9:.2f} GB/s",
            highlight=False,
        )


def _cut_table(report: InspectReport) -> Table:
    """The cut points as a table that fits 80 columns: one row per set of frozen parameters, the
    cuts equivalent to it named under it; a caption says what each column is."""
    rows = report.rows()
    groups = len(rows)
    table = Table(
        title=f"{report.spec} at {report.img_size}px: {len(report.graph.cut_points)} cut points "
        f"({groups} sets of frozen parameters), {report.total_flops / 1e9:.2f} GFLOPs/image, "
        f"{report.total_params / 1e6:.1f} M params",
        box=box.SIMPLE_HEAD,
        padding=0,  # the box's column separator is the space between columns
        pad_edge=False,
        caption_justify="left",
    )
    cols = ["#", "cut after", "shape", "KiB", "prefix\nFLOPs", "trainable"]
    if report.cost:
        cols += ["cached\nms", "freeze\nms", "pays\nafter"]
    cells = []
    for r in rows:
        where = r["module"] or r["name"]
        if r["module"] and r["name"] != r["module"].replace(".", "_"):  # a node of its own name
            where += f" [dim]({r['name']})[/]"
        if r["alternatives"]:
            where += "\n[dim]= " + ", ".join(a["name"] for a in r["alternatives"]) + "[/]"
        row = [
            str(r["index"]),
            where,
            "x".join(map(str, r["shape"])),
            f"{r['bytes_per_sample'] / 2**10:,.1f}",
            f"{100 * r['prefix_flops_fraction']:.1f}%",
            f"{r['suffix_params']:,}",
        ]
        if report.cost:
            pays = r["pays_after_epochs"]
            row += [
                f"{r['step_ms']:,.1f}",
                f"{r['freeze_only_step_ms']:,.1f}",
                "never" if pays is None else f"{pays} ep",
            ]
        cells.append(row)
    for i, name in enumerate(cols):
        if name == "cut after":  # the one column that wraps: it takes what the numbers leave
            table.add_column(name, ratio=1, overflow="fold")
        else:  # numbers are never cut
            width = max(len(line) for text in [name, *(row[i] for row in cells)] for line in text.split("\n"))
            table.add_column(name, justify="right", no_wrap=True, min_width=width)
    for row in cells:
        table.add_row(*row)
    caption = (
        "#, cut after: the cut's index and module (fx node); fixed:CUT@N takes any of them. "
        "= names the other cuts that freeze the same parameters. "
        "shape, KiB: one image's activation at the cut (KiB as fp32; bf16 is half). "
        "prefix FLOPs: the forward FLOPs before the cut. trainable: the parameters after it."
    )
    if report.cost:
        c = report.cost
        caption += (
            f" cached ms: predicted training step at batch {c.batch_size} with the prefix's "
            f"activations read from a cache ({report.tier} tier); freeze ms: the same, freeze-only, "
            "the frozen prefix recomputed every step. pays after: epochs of "
            f"{report.images:,} images after which a cache ({report.views} views per image) has "
            "saved the time it took to build, against freeze-only."
        )
    table.caption = caption
    return table


data_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Data sources: export the built-in ones as image folders."
)
app.add_typer(data_app, name="data")


@data_app.command("export")
def data_export(
    source: str = typer.Argument(..., help="built-in source: fashion-mnist"),
    out_dir: Path = typer.Argument(..., help="folder to write train/<class>/*.png and val/<class>/*.png"),
    limit: Optional[int] = typer.Option(
        None, help=f"class-balanced subsets: N training images and {_LIMIT_VAL} validation images"
    ),
) -> None:
    """Write a built-in data source as an ImageFolder tree (the layout `--data DIR` reads)."""
    if source != "fashion-mnist":
        raise fxdrop.DataError(f"unknown built-in data source '{source}'; available: fashion-mnist")
    written = export_fashion_mnist(str(out_dir), limit=limit)
    console.print(
        f"wrote {written['train']:,} training and {written['val']:,} validation images of "
        f"{len(written['per_class']['train'])} classes to [bold]{out_dir}[/bold] "
        f"(train/<class>/*.png, val/<class>/*.png); use it with --data {out_dir}"
    )


@app.command("clean-cache")
def clean_cache() -> None:
    """Forget the image files' hashes fxdrop remembers between runs (runs' activation caches stay)."""
    cleared = clear_file_facts()
    console.print(f"removed {cleared.files} file-facts memo(s), {_mib(cleared.bytes)}, from {cleared.folder}")


@app.command()
def finetune(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="fashion-mnist, fashion-mnist:0-4 (those classes, relabelled from 0), or a folder with "
        "train/<class>/* and val/<class>/*",
        rich_help_panel=_DATA,
    ),
    img_size: Optional[int] = typer.Option(
        None,
        help="input size in pixels",
        show_default="auto: 32 for fashion-mnist; for a folder the model's own, or the images' own when "
        "smaller, but not below the model's downsampling",
        rich_help_panel=_DATA,
    ),
    limit: Optional[int] = typer.Option(
        None,
        help=f"use class-balanced subsets: N training images and {_LIMIT_VAL} validation images",
        show_default="every image",
        rich_help_panel=_DATA,
    ),
    workers: int = typer.Option(
        FitConfig.num_workers,
        "--workers",
        "-j",
        help="DataLoader worker processes for image batches",
        rich_help_panel=_DATA,
    ),
    pretrained: Optional[bool] = typer.Option(
        None,
        "--pretrained/--no-pretrained",
        metavar="",
        help="start from the hub's weights",
        show_default="auto: yes for timm: and torchvision: models, no for a file's or with --weights",
        rich_help_panel=_MODEL,
    ),
    weights: Optional[Path] = typer.Option(
        None,
        help="start from a local state dict: .safetensors, or .pth read weights-only (never runs code); "
        "DDP's `module.` prefix is removed",
        rich_help_panel=_MODEL,
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        metavar="",
        help="torch.compile (inductor) the trainable model, again after each drop",
        rich_help_panel=_MODEL,
    ),
    epochs: int = typer.Option(
        FitConfig.epochs, "--epochs", "-e", help="passes over the training data", rich_help_panel=_TRAINING
    ),
    batch_size: int = typer.Option(
        FitConfig.batch_size, "--batch-size", "-b", help="global batch size", rich_help_panel=_TRAINING
    ),
    lr: Optional[float] = typer.Option(
        FitConfig.lr,
        help="peak learning rate",
        show_default="auto: 0.1 x batch / 256 with sgd, so 0.025 at batch 64; 1e-3 with adamw",
        rich_help_panel=_TRAINING,
    ),
    optimizer: str = typer.Option(
        FitConfig.optimizer, "--optimizer", "--opt", help="sgd or adamw", rich_help_panel=_TRAINING
    ),
    momentum: float = typer.Option(FitConfig.momentum, help="SGD momentum", rich_help_panel=_TRAINING),
    weight_decay: float = typer.Option(
        FitConfig.weight_decay, "--weight-decay", "--wd", help="weight decay", rich_help_panel=_TRAINING
    ),
    warmup_epochs: float = typer.Option(
        FitConfig.warmup_epochs,
        help="linear learning-rate warm-up before the cosine decay",
        rich_help_panel=_TRAINING,
    ),
    smoothing: float = typer.Option(
        FitConfig.label_smoothing, help="label smoothing of the cross-entropy", rich_help_panel=_TRAINING
    ),
    amp: Optional[bool] = typer.Option(
        None,
        "--amp/--no-amp",
        metavar="",
        help="bf16 autocast",
        show_default="auto: on with CUDA, off on the CPU",
        rich_help_panel=_TRAINING,
    ),
    device: Optional[str] = typer.Option(
        None,
        help="cpu, cuda, cuda:1",
        show_default="auto: cuda if available, else cpu",
        rich_help_panel=_TRAINING,
    ),
    seed: int = typer.Option(
        FitConfig.seed,
        help="seeds the model's initialisation, data order, augmentation and dropout",
        rich_help_panel=_TRAINING,
    ),
    clip_grad: Optional[float] = typer.Option(
        FitConfig.clip_grad,
        help="clip the trainable parameters' gradients to this before each optimizer step",
        show_default="no clipping",
        rich_help_panel=_TRAINING,
    ),
    clip_mode: str = typer.Option(
        FitConfig.clip_mode, help="how --clip-grad clips: norm | value | agc", rich_help_panel=_TRAINING
    ),
    grad_accum_steps: int = typer.Option(
        FitConfig.grad_accum_steps,
        help="batches per optimizer step (the schedule counts optimizer steps; default --lr scales "
        "with batch x N)",
        rich_help_panel=_TRAINING,
    ),
    model_ema: bool = typer.Option(
        FitConfig.model_ema,
        "--model-ema",
        metavar="",
        help="keep an EMA of the weights (OUT/model-ema.safetensors; a dropped prefix's is its weights)",
        rich_help_panel=_TRAINING,
    ),
    model_ema_decay: float = typer.Option(
        FitConfig.model_ema_decay, help="the EMA's decay per optimizer step", rich_help_panel=_TRAINING
    ),
    model_ema_eval: bool = typer.Option(
        FitConfig.model_ema_eval,
        "--model-ema-eval",
        metavar="",
        help="validate, and choose OUT/model-best.safetensors, with the EMA's weights",
        rich_help_panel=_TRAINING,
    ),
    mixup: float = typer.Option(
        FitConfig.mixup, help="mixup alpha; mixing trains on soft targets (0: off)", rich_help_panel=_MIXING
    ),
    cutmix: float = typer.Option(FitConfig.cutmix, help="CutMix alpha (0: off)", rich_help_panel=_MIXING),
    cutmix_minmax: Optional[Tuple[float, float]] = typer.Option(
        FitConfig.cutmix_minmax,
        help="CutMix box sides as fractions of the image, MIN MAX (instead of --cutmix's alpha)",
        show_default="off",
        rich_help_panel=_MIXING,
    ),
    mixup_prob: float = typer.Option(
        FitConfig.mixup_prob, help="probability of mixing a batch (or sample)", rich_help_panel=_MIXING
    ),
    mixup_switch_prob: float = typer.Option(
        FitConfig.mixup_switch_prob,
        help="probability of CutMix when both are on",
        rich_help_panel=_MIXING,
    ),
    mixup_mode: str = typer.Option(
        FitConfig.mixup_mode, help="what shares one draw: batch | pair | elem", rich_help_panel=_MIXING
    ),
    mix_after_drop: str = typer.Option(
        FitConfig.mix_after_drop,
        help="after a drop (images gone): activations (mix the cut's activations; CutMix a box on "
        "the feature map) | stop",
        rich_help_panel=_MIXING,
    ),
    patience: Optional[int] = typer.Option(
        FitConfig.patience,
        help="stop after N validated epochs without a better validation accuracy "
        "(the best epoch's weights: OUT/model-best.safetensors)",
        show_default="never stop early",
        rich_help_panel=_TRAINING,
    ),
    policy: str = typer.Option("learn-drop", "--policy", "-p", help=_POLICY_HELP, rich_help_panel=_DROPPING),
    landing: float = typer.Option(
        FitConfig.landing,
        help="epochs over which a segment's learning rate anneals to zero before it freezes (0: at once)",
        rich_help_panel=_DROPPING,
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, help="activation cache folder", show_default="OUT/cache", rich_help_panel=_CACHE
    ),
    cache_dtype: str = typer.Option(
        FitConfig.cache_dtype,
        help="how activations are stored: auto | fp32 | bf16 | fp16 | int8 | fp8 "
        "(auto: the most exact that fits the fastest memory)",
        rich_help_panel=_CACHE,
    ),
    cache_memory: Optional[str] = typer.Option(
        None,
        help="memory the cache may take, e.g. 2GiB, 500MB",
        show_default="half of what is free",
        rich_help_panel=_CACHE,
    ),
    cache_views: int = typer.Option(
        FitConfig.cache_views,
        help="augmented views cached per sample, rotated by epoch (1 = the paper)",
        rich_help_panel=_CACHE,
    ),
    keep_cache: bool = typer.Option(
        FitConfig.keep_cache,
        metavar="",
        help="keep the activation cache after the run (reused by a rerun and `fxdrop update`)",
        rich_help_panel=_CACHE,
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="output folder: model.safetensors, metrics.json, config.json, checkpoint",
        rich_help_panel=_OUTPUT,
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        metavar="",
        help="continue the run in --out from its last finished epoch",
        rich_help_panel=_OUTPUT,
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar="", help="replace the run in --out", rich_help_panel=_OUTPUT
    ),
    log_tensorboard: bool = typer.Option(
        FitConfig.log_tensorboard,
        "--log-tensorboard",
        metavar="",
        help="TensorBoard event files in OUT/tensorboard (pip install tensorboard)",
        rich_help_panel=_OUTPUT,
    ),
) -> None:
    """Fine-tune MODEL on real images, dropping the layers that have stopped learning."""
    pol = parse_policy(policy)
    with _progress(epochs, limit) as shown:
        result = run_finetune(
            model,
            data,
            out,
            policy=pol,
            img_size=img_size,
            pretrained=(pretrained if pretrained is not None else model_family(model)[0] != "file")
            and weights is None,
            weights=str(weights) if weights else None,
            limit=limit,
            resume=resume,
            overwrite=overwrite,
            on_event=shown,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            label_smoothing=smoothing,
            amp=amp,
            cache_dir=str(cache_dir) if cache_dir else None,
            cache_dtype=cache_dtype,
            cache_memory=size_in_bytes(cache_memory, "cache_memory") if cache_memory else None,
            cache_views=cache_views,
            keep_cache=keep_cache,
            device=device,
            num_workers=workers,
            seed=seed,
            compile="inductor" if compile else None,
            mixup=mixup,
            cutmix=cutmix,
            cutmix_minmax=cutmix_minmax,
            mixup_prob=mixup_prob,
            mixup_switch_prob=mixup_switch_prob,
            mixup_mode=mixup_mode,
            mix_after_drop=mix_after_drop,
            patience=patience,
            clip_grad=clip_grad,
            clip_mode=clip_mode,
            grad_accum_steps=grad_accum_steps,
            model_ema=model_ema,
            model_ema_decay=model_ema_decay,
            model_ema_eval=model_ema_eval,
            log_tensorboard=log_tensorboard,
            landing=landing,
        )
    if not _main_rank():
        return
    table = Table(title=f"fxdrop finetune {model}: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("wall-clock", f"{result.total_seconds:.1f} s")
    table.add_row("final val accuracy (full model)", f"{100 * result.final_val_acc:.2f}%")
    if result.best_epoch is not None:
        table.add_row(
            "best epoch (model-best.safetensors)", f"{result.best_epoch}: {100 * result.best_val_acc:.2f}%"
        )
    if result.stopped_early:
        table.add_row("stopped early", f"after epoch {result.stopped_early.after_epoch}")
    table.add_row("drops", str(len(result.events)))
    final_cut = result.graph.cut_points[result.cut].module if result.cut >= 0 else "none"
    table.add_row("final cut", str(final_cut))
    table.add_row(
        "forward FLOPs saved (per step, over the run)", f"{100 * (1 - result.forward_flops_fraction):.1f}%"
    )
    table.add_row(
        "training FLOPs saved (forward + backward)", f"{100 * (1 - result.train_flops_fraction):.1f}%"
    )
    table.add_row("cache size", _mib(result.cache_bytes))
    table.add_row("checkpoint size", _mib(result.checkpoint_bytes))
    table.add_row("outputs", str(out))
    console.print(table)
    _after(result, out, keep_cache)


def _after(result: fxdrop.FitResult, out: Path, keep_cache: bool) -> None:
    """What a finished run or update left on disk, and where to look next."""
    if result.cut >= 0 and keep_cache and result.cache_bytes:
        console.print(
            f"kept the activation cache ({_mib(result.cache_bytes)} on disk) for `fxdrop update`; "
            "--no-keep-cache removes it at the end"
        )
    console.print(f"the run's story: fxdrop report {out}")


@app.command()
def update(
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
        None, help=f"use class-balanced subsets: N training images and {_LIMIT_VAL} validation images"
    ),
    keep_cache: bool = typer.Option(
        FitConfig.keep_cache, metavar="", help="keep the activation cache for the next update"
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: the run's)"),
    workers: Optional[int] = typer.Option(
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
        k: v for k, v in {"lr": lr, "device": device, "num_workers": workers}.items() if v is not None
    }
    with _progress(epochs, limit) as shown:
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
    if not _main_rank():
        return
    u = result.update
    table = Table(title=f"fxdrop update {out} (update {u.update})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("images new / removed", f"{u.new_samples} / {u.removed_samples}")
    table.add_row("activations reused from the cache", str(u.reused_samples))
    if u.get("reclaimed_bytes"):
        table.add_row("cache compacted (removed images' rows)", f"{_mib(u.reclaimed_bytes)} reclaimed")
    table.add_row(
        "images through the frozen prefix",
        f"{u.prefix_samples} in {u.prefix_seconds:.1f} s" + (" (cache rebuilt)" if u.rebuilt_cache else ""),
    )
    table.add_row("trained on", "every image" if u.replay == "all" else "the new images")
    cut = lambda k: result.graph.cut_points[k].module if k >= 0 else "none"  # noqa: E731
    table.add_row("cut", f"{cut(u.cut_before)} -> {cut(u.cut)}" if u.cut != u.cut_before else cut(u.cut))
    table.add_row("wall-clock", f"{u.total_seconds:.1f} s")
    table.add_row("final val accuracy (full model)", f"{100 * u.final_val_acc:.2f}%")
    console.print(table)
    _after(result, out, keep_cache)


@app.command()
def report(
    out: Path = typer.Argument(..., help="a run's folder (made by finetune, with or without updates)"),
    png: Optional[Path] = typer.Option(None, help="where to write the picture (default: OUT/report.png)"),
) -> None:
    """A run's story: accuracy, step time and the cut against wall-clock, drops and updates marked."""
    story = fxdrop.run_report(out)
    picture = fxdrop.plot_report(story, png or out / "report.png")
    table = Table(title=f"fxdrop report {out} ({story.model})")
    for col, justify in (
        ("phase", "left"),
        ("epoch", "right"),
        ("wall-clock s", "right"),
        ("loss", "right"),
        ("val acc", "right"),
        ("step ms", "right"),
        ("cut after", "left"),
        ("train FLOPs", "right"),
        ("events", "left"),
    ):
        table.add_column(col, justify=justify)
    drops = {}
    for m in story.marks:
        if m.kind == "drop":
            row = next((r for r in story.rows if r.clock_s > m.clock_s), None)  # the epoch it came in
            drops.setdefault(id(row), []).append(
                ("[red]" if m.hurt else "[green]") + f"drop {m.label}" + (" (hurt)" if m.hurt else "") + "[/]"
            )
    for i, r in enumerate(story.rows):
        if i and r.phase != story.rows[i - 1].phase:
            table.add_section()
        acc = "-" if r.val_acc is None else f"{100 * r.val_acc:.2f}%"
        table.add_row(
            r.phase,
            str(r.epoch),
            f"{r.clock_s:.1f}",
            "-" if r.train_loss is None else f"{r.train_loss:.3f}",
            acc,
            f"{1e3 * r.step_s:.0f}",
            r.cut,
            f"{100 * r.train_flops_fraction:.0f}%",
            ", ".join(drops.get(id(r), [])),
        )
    console.print(table)
    for i, u in enumerate(story.updates, start=1):
        console.print(
            f"update {i}: {u.new_samples} new, {u.removed_samples} removed, {u.reused_samples} "
            f"activations reused, {u.prefix_samples} through the prefix in {u.prefix_seconds:.1f} s"
            + (" (cache rebuilt)" if u.rebuilt_cache else "")
        )
    console.print(
        f"final val accuracy {100 * story.final_val_acc:.2f}%; {story.total_seconds:.1f} s in all; "
        f"cache {_mib(story.cache_bytes)}; decisions {story.decide_seconds:.2f} s"
    )
    console.print(f"picture: {picture}")


# `fit` arguments whose flag has another name
_RENAMED = {"num_workers": "workers", "label_smoothing": "smoothing"}


def _as_flags(message: str, command: str | None = None) -> str:
    """A library message with each backticked `fit` argument (`cache_dir`, `resume=True`) written as
    the flag `command` ("finetune", "data export"; None: the one being run) has for it (--cache-dir,
    --resume); a name it has no flag for stays as the library wrote it."""
    flags = _flags_of(command)

    def flag(m: re.Match) -> str:
        name = "--" + _RENAMED.get(m.group(1), m.group(1)).replace("_", "-")
        name = "--no-" + name[2:] if m.group(2) == "False" else name
        return name if name in flags else m.group(0)

    return re.sub(r"`([a-z_]+)(?:=(True|False))?`", flag, message)


def _flags_of(command: str | None) -> set[str]:
    """The long flags of `command`'s options; None: of the command on the command line."""
    cmd = typer.main.get_command(app)
    for word in command.split() if command is not None else sys.argv[1:]:
        sub = cmd.commands.get(word) if isinstance(cmd, typer.core.TyperGroup) else None
        if sub is None:
            break
        cmd = sub
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


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
    except fxdrop.FxdropError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {_as_flags(str(exc))}", highlight=False, soft_wrap=True)
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
