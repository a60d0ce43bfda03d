"""`fxdrop`: each command parses its options, calls one library function, and renders the result."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import fxdrop
from fxdrop.config import FitConfig
from fxdrop.data import export_fashion_mnist
from fxdrop.finetuning import finetune as run_finetune
from fxdrop.inspection import inspect_model
from fxdrop.models import model_family
from fxdrop.policies import parse_policy

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train CNNs faster by dropping the layers that have stopped learning (Learn&Drop on torch.fx).",
)
console = Console()
if not console.is_terminal:
    console.width = max(console.width, 160)  # piped tables stay readable, not folded to 80 columns
err_console = Console(stderr=True)

_MODEL_HELP = "timm:NAME, torchvision:NAME, path/to/file.py:FACTORY, or a bare timm name (resnet18)"
_POLICY_HELP = (
    "learn-drop | autofreeze | freezeout | none | fixed:CUT@N (CUT from `fxdrop inspect`; "
    "dropped after N epochs, @0: from the start)"
)


@app.callback()
def _root() -> None:
    """fxdrop: Learn&Drop layer dropping for any timm/torchvision CNN or nn.Module."""


@app.command()
def inspect(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    img_size: Optional[int] = typer.Option(None, help="input size in pixels (default: the model's own)"),
    as_json: bool = typer.Option(False, "--json", help="print the cut points as a JSON list"),
    cost: bool = typer.Option(
        False, "--cost", help="time training steps here and predict the step time per cut"
    ),
    device: Optional[str] = typer.Option(None, help="device for --cost (default: cuda if available)"),
    batch_size: int = typer.Option(64, help="batch size for --cost"),
    tier: Optional[str] = typer.Option(None, help="cache tier for --cost: device | pinned | memory | disk"),
) -> None:
    """List a model's cut points: shape, MiB per sample, prefix FLOPs, trainable parameters."""
    report = inspect_model(model, img_size, cost=cost, device=device, batch_size=batch_size, tier=tier)
    rows = report.rows()
    if report.warning:
        err_console.print(
            f"[yellow]warning:[/yellow] {_as_flags(report.warning)}", highlight=False, soft_wrap=True
        )
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(
        title=f"{report.spec} at {report.img_size}px: {len(rows)} cut points, "
        f"{report.total_flops / 1e9:.2f} GFLOPs/sample, {report.total_params / 1e6:.1f} M params"
    )
    cols = ["#", "node", "module", "shape", "MiB fp32", "MiB bf16", "prefix FLOPs", "trainable params"]
    if report.cost:
        cols += ["step ms", "ideal ms"]
    for col in cols:
        table.add_column(col, justify="right" if col not in ("node", "module") else "left")
    for r in rows:
        mb = r["bytes_per_sample"] / 2**20
        cells = [
            str(r["index"]),
            r["name"],
            r["module"] or "(top)",
            "x".join(map(str, r["shape"])),
            f"{mb:.3f}",
            f"{mb / 2:.3f}",
            f"{100 * r['prefix_flops_fraction']:.1f}%",
            f"{r['suffix_params']:,}",
        ]
        if report.cost:
            cells += [f"{r['step_ms']:.2f}", f"{r['ideal_step_ms']:.2f}"]
        table.add_row(*cells)
    console.print(table)
    if report.cost:
        c = report.cost
        console.print(
            f"full model step: {1e3 * c.step_s(-1):.2f} ms at batch {c.batch_size} (every segment's forward and "
            f"backward, timed); cached activations read from the {report.tier} tier at {c.bandwidth(0) / 1e9:.2f} GB/s"
        )


data_app = typer.Typer(no_args_is_help=True, help="Data sources: export the built-in ones as image folders.")
app.add_typer(data_app, name="data")


@data_app.command("export")
def data_export(
    source: str = typer.Argument(..., help="built-in source: fashion-mnist"),
    out_dir: Path = typer.Argument(..., help="folder to write train/<class>/*.png and val/<class>/*.png"),
    limit: Optional[int] = typer.Option(None, help="class-balanced subset of this many training images"),
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


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def _bytes(text: str, flag: str) -> int:
    """A size such as 2GiB, 500MB or 1e9 in bytes; anything else is one clear error."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).lower()] < 1:
        raise fxdrop.ConfigError(
            flag.lstrip("-").replace("-", "_"), f"must be a size such as 2GiB or 500MB, got {text!r}"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 or not nbytes else f"{nbytes / 2**10:.1f} KiB"


class _Progress:
    """Renders fit's events: progress bars for epochs, steps and cache building; a line per drop.
    The bars appear with the first epoch, so an error found before it is the only thing shown."""

    def __init__(self, epochs: int) -> None:
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self.p = Progress(*columns, console=console, transient=False)
        self.total = epochs
        self.epochs: TaskID | None = None
        self.steps: TaskID | None = None
        self.cache: TaskID | None = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.epochs is not None:
            self.p.stop()

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

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "img_size":
            if info["why"] != "asked for":
                self._say(f"image size {info['img_size']} px: {info['why']} (--img-size to choose)")
            if info["warning"]:
                self._say(f"[yellow]warning:[/yellow] {_as_flags(info['warning'])}")
        elif kind == "weights":
            self._say(info["line"])
        elif kind == "data":
            skipped = f"; skipped {info['skipped']} unreadable image(s)" if info["skipped"] else ""
            self._say(
                f"data {info['source']}: {info['train']} training and {info['val']} validation "
                f"images, {info['classes']} classes{skipped}"
            )
        elif kind == "cache_rebuilt":
            self._say(
                f"the run's cache is gone; rebuilt it at cut {info['cut']} from the images "
                f"({info['samples']} samples)"
            )
        elif kind == "epoch_start":
            self._bars(info["epoch"] - 1)
            cut = "full model" if info["cut"] < 0 else f"suffix after cut {info['cut']}"
            self.p.reset(self.steps, total=info["steps"], description=f"epoch {info['epoch']} ({cut})")
        elif kind == "step":
            self.p.update(
                self.steps,
                completed=info["step"],
                description=f"epoch {info['epoch']} loss {info['loss']:.3f}",
            )
        elif kind == "cache":
            desc = f"caching {info['split']} view {info['view']}"
            if self.cache is None:
                self.cache = self.p.add_task(desc, total=info["total"])
            self.p.update(self.cache, completed=info["done"], total=info["total"], description=desc)
        elif kind == "drop":
            self._close_cache_bar()
            why = info.get("why") or {}
            fmt = f" ({info['cache_dtype']})" if info.get("cache_dtype") else ""
            how = (
                f"cache {_mib(info['cache_bytes'])}{fmt} built in {info['cache_seconds']:.1f} s"
                if info["cached"]
                else "freeze-only (prefix recomputed)"
            )
            self._say(
                f"[bold green]drop[/bold green] epoch {info['epoch']}: cut {info['cut']} after "
                f"[bold]{info['module'] or info['node']}[/bold], {info['frozen_params']:,} parameters frozen, {how}"
            )
            if info.get("cache_dtype_why"):
                self._say(f"     cache format {info['cache_dtype_why']}")
            if "predicted_step_s" in why:
                self._say(
                    f"     predicted step {1e3 * why['predicted_step_s_before']:.0f} -> "
                    f"{1e3 * why['predicted_step_s']:.0f} ms"
                )
        elif kind == "cached":
            self._close_cache_bar()
            self._say(
                f"[bold green]cache[/bold green] epoch {info['epoch']}: built the activations at cut {info['cut']} "
                f"({info['module'] or info['node']}), {_mib(info['cache_bytes'])} in {info['cache_seconds']:.1f} s: "
                "freeze-only there had cost as much"
            )
            if info.get("cache_dtype_why"):
                self._say(f"     cache format {info['cache_dtype_why']}")
        elif kind == "no_drop":
            self._say(f"no drop: {info['reason']}")
        elif kind == "epoch_end":
            self.p.advance(self.epochs)
            acc = "-" if info["val_acc"] is None else f"{100 * info['val_acc']:.2f}%"
            self._say(
                f"epoch {info['epoch']}: loss {info['train_loss']:.4f}  val acc {acc}  "
                f"{info['seconds']:.1f}s  forward FLOPs {100 * info['forward_flops_fraction']:.1f}%"
            )


def _progress(epochs: int) -> _Progress | contextlib.nullcontext:
    """The screen's progress; under torchrun, ranks other than 0 show nothing (`on_event` None)."""
    return _Progress(epochs) if _main_rank() else contextlib.nullcontext()


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports


@app.command()
def finetune(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data: str = typer.Option(
        ..., "--data", "-d", help="fashion-mnist, or a folder with train/<class>/* and val/<class>/*"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="output folder: model.safetensors, metrics.json, config.json, checkpoint"
    ),
    epochs: int = typer.Option(FitConfig.epochs, "--epochs", "-e", help="passes over the training data"),
    batch_size: int = typer.Option(FitConfig.batch_size, "--batch-size", "-b", help="global batch size"),
    lr: Optional[float] = typer.Option(
        FitConfig.lr, help="peak learning rate (default: 0.1*batch/256 for SGD, 1e-3 AdamW)"
    ),
    optimizer: str = typer.Option(FitConfig.optimizer, "--optimizer", "--opt", help="sgd or adamw"),
    momentum: float = typer.Option(FitConfig.momentum, help="SGD momentum"),
    weight_decay: float = typer.Option(FitConfig.weight_decay, "--weight-decay", "--wd", help="weight decay"),
    warmup_epochs: float = typer.Option(
        FitConfig.warmup_epochs, help="linear learning-rate warm-up before the cosine decay"
    ),
    smoothing: float = typer.Option(FitConfig.label_smoothing, help="label smoothing of the cross-entropy"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default: on CUDA only)"),
    img_size: Optional[int] = typer.Option(
        None,
        help="input size in pixels (default: the model's own, or the "
        "images' own when smaller; 32 for fashion-mnist)",
    ),
    policy: str = typer.Option("learn-drop", "--policy", "-p", help=_POLICY_HELP),
    cache_dir: Optional[Path] = typer.Option(None, help="activation cache folder (default: OUT/cache)"),
    cache_dtype: str = typer.Option(
        FitConfig.cache_dtype,
        help="how activations are stored: auto | fp32 | bf16 | fp16 | int8 | fp8 "
        "(auto: the most exact that fits the fastest memory)",
    ),
    cache_memory: Optional[str] = typer.Option(
        None, help="memory the cache may take, e.g. 2GiB, 500MB (default: half of what is free)"
    ),
    cache_views: int = typer.Option(
        FitConfig.cache_views, help="augmented views cached per sample, rotated by epoch (1 = the paper)"
    ),
    keep_cache: bool = typer.Option(
        FitConfig.keep_cache, help="keep the activation cache after the run (reused by a rerun)"
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)"),
    pretrained: Optional[bool] = typer.Option(
        None,
        "--pretrained/--no-pretrained",
        help="start from the hub's weights (default: yes for timm/torchvision)",
    ),
    weights: Optional[Path] = typer.Option(None, help="start from a local state dict (.safetensors or .pth)"),
    limit: Optional[int] = typer.Option(None, help="train on a class-balanced subset of N images"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last finished epoch"),
    overwrite: bool = typer.Option(False, help="replace the run in --out"),
    workers: int = typer.Option(
        FitConfig.num_workers, "--workers", "-j", help="DataLoader worker processes for image batches"
    ),
    seed: int = typer.Option(
        FitConfig.seed, help="seeds the model's initialisation, data order, augmentation and dropout"
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile (inductor) the trainable model, again after each drop"
    ),
) -> None:
    """Fine-tune MODEL on real images, dropping the layers that have stopped learning."""
    pol = parse_policy(policy)
    with _progress(epochs) as shown:
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
            cache_memory=_bytes(cache_memory, "--cache-memory") if cache_memory else None,
            cache_views=cache_views,
            keep_cache=keep_cache,
            device=device,
            num_workers=workers,
            seed=seed,
            compile="inductor" if compile else None,
        )
    if not _main_rank():
        return
    table = Table(title=f"fxdrop finetune {model}: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("wall-clock", f"{result.total_seconds:.1f} s")
    table.add_row("final val accuracy (full model)", f"{100 * result.final_val_acc:.2f}%")
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
    limit: Optional[int] = typer.Option(None, help="use a class-balanced subset of N training images"),
    keep_cache: bool = typer.Option(
        FitConfig.keep_cache, help="keep the activation cache for the next update"
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: the run's)"),
    workers: Optional[int] = typer.Option(
        None, "--workers", "-j", help="DataLoader worker processes (default: the run's)"
    ),
    resume: bool = typer.Option(False, help="finish an update of OUT that was interrupted"),
) -> None:
    """Continue a finished run on new or changed images: only what is new goes through the frozen prefix."""
    overrides = {
        k: v for k, v in {"lr": lr, "device": device, "num_workers": workers}.items() if v is not None
    }
    with _progress(epochs) as shown:
        result = fxdrop.update_folder(
            out,
            data,
            limit=limit,
            epochs=epochs,
            replay=replay,
            resume=resume,
            on_event=shown,
            keep_cache=keep_cache,
            **overrides,
        )
    if not _main_rank():
        return
    u = result.update
    table = Table(title=f"fxdrop update {out} (update {u['update']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("images new / removed", f"{u['new_samples']} / {u['removed_samples']}")
    table.add_row("activations reused from the cache", str(u["reused_samples"]))
    if u.get("reclaimed_bytes"):
        table.add_row("cache compacted (removed images' rows)", f"{_mib(u['reclaimed_bytes'])} reclaimed")
    table.add_row(
        "images through the frozen prefix",
        f"{u['prefix_samples']} in {u['prefix_seconds']:.1f} s"
        + (" (cache rebuilt)" if u["rebuilt_cache"] else ""),
    )
    table.add_row("trained on", "every image" if u["replay"] == "all" else "the new images")
    cut = lambda k: result.graph.cut_points[k].module if k >= 0 else "none"  # noqa: E731
    table.add_row(
        "cut", f"{cut(u['cut_before'])} -> {cut(u['cut'])}" if u["cut"] != u["cut_before"] else cut(u["cut"])
    )
    table.add_row("wall-clock", f"{u['total_seconds']:.1f} s")
    table.add_row("final val accuracy (full model)", f"{100 * u['final_val_acc']:.2f}%")
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
        ("val acc", "right"),
        ("step ms", "right"),
        ("cut after", "left"),
        ("FLOPs/step", "right"),
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
            acc,
            f"{1e3 * r.step_s:.0f}",
            r.cut,
            f"{100 * r.flops_fraction:.0f}%",
            ", ".join(drops.get(id(r), [])),
        )
    console.print(table)
    for i, u in enumerate(story.updates, start=1):
        console.print(
            f"update {i}: {u['new_samples']} new, {u['removed_samples']} removed, {u['reused_samples']} "
            f"activations reused, {u['prefix_samples']} through the prefix in {u['prefix_seconds']:.1f} s"
            + (" (cache rebuilt)" if u["rebuilt_cache"] else "")
        )
    console.print(
        f"final val accuracy {100 * story.final_val_acc:.2f}%; {story.total_seconds:.1f} s in all; "
        f"cache {_mib(story.cache_bytes)}; decisions {story.decide_seconds:.2f} s"
    )
    console.print(f"picture: {picture}")


# `fit` arguments as the library names them in its messages -> the flags a CLI user types
_FLAGS = {
    "`resume=True`": "--resume",
    "`overwrite=True`": "--overwrite",
    "`pretrained=False`": "--no-pretrained",
    "`pretrained=True`": "--pretrained",
    "`num_workers`": "--workers",
    "`compile`": "--compile",
    "`weights`": "--weights",
}


def _as_flags(message: str) -> str:
    """A library message with its `fit` argument names replaced by this command's flags."""
    for arg, flag in _FLAGS.items():
        message = message.replace(arg, flag)
    return re.sub(r"`([a-z_]+)`", lambda m: "--" + m.group(1).replace("_", "-"), message)


class _Terminated(BaseException):
    """SIGTERM or SIGINT, raised in the main thread so that writes in progress clean up; not a
    KeyboardInterrupt, which typer would turn into a silent exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM


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
            "interrupted; the last finished epoch is kept: rerun with --resume to continue",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(exc.code if isinstance(exc, _Terminated) else 130)


if __name__ == "__main__":
    main()
