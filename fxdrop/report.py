"""A run's story at a glance: its epochs and its updates on one wall-clock, with every drop and
update marked, read from the run folder's metrics.json (`fxdrop report OUT`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunDirError
from .messages import Entry
from .records import Epoch, Metrics, RunConfig, Stretch, UpdateEntry

__all__ = ["RunReport", "Row", "Span", "Mark", "run_report", "plot_report"]


@dataclass(frozen=True)
class Span:
    """A stretch of an epoch's steps at one cut, placed on the wall-clock by its share of the steps."""

    start_s: float
    end_s: float
    forward_flops: float  # forward FLOPs per step, as a fraction of the whole model's
    train_flops: float  # forward + backward FLOPs per step, as a fraction of the whole model's
    step_s: float  # measured mean step (the epoch's, for runs that recorded no step per stretch)


@dataclass(frozen=True)
class Row:
    """One epoch, of the run or of an update."""

    phase: str  # "run", "update 1", "update 2", ...
    epoch: int  # within its phase, from 1
    clock_s: float  # wall-clock at the end of the epoch, from the start of the run
    val_acc: float | None
    step_s: float  # mean training step
    cut: str  # the module the cut follows ("-": nothing dropped)
    flops_fraction: float  # forward FLOPs per step, as a fraction of the whole model's (the epoch's mean)
    train_loss: float | None = None  # the epoch's mean training loss
    # forward + backward FLOPs per step, as a fraction of the whole model's (the epoch's mean)
    train_flops_fraction: float = 1.0
    spans: tuple[Span, ...] = ()  # the epoch's stretches at one cut


@dataclass(frozen=True)
class Mark:
    """A drop or the start of an update, on the same wall-clock."""

    kind: str  # "drop" | "update"
    clock_s: float
    label: str
    hurt: bool = False  # a drop after which validation fell beyond its noise


@dataclass(frozen=True)
class RunReport:
    path: Path
    model: str
    rows: list[Row]
    marks: list[Mark]
    final_val_acc: float  # the latest: after the last update, if any
    total_seconds: float  # the run's and its updates'
    cache_bytes: int
    decide_seconds: float
    updates: list[UpdateEntry] = field(default_factory=list)  # what each update took and reused


def _spans(e: Epoch, clock: float) -> tuple[Span, ...]:
    """Epoch `e`'s stretches at one cut, placed by their share of its steps (as the drop marks
    are) from wall-clock `clock`; an epoch recorded without stretches (an older run) is one."""
    stretches = e.stretches or [
        Stretch(e.cut, True, 1, e.step_seconds, e.forward_flops_fraction, e.train_flops_fraction)
    ]
    total, done, spans = max(sum(st.steps for st in stretches), 1), 0, []
    for st in stretches:
        start, end = clock + e.seconds * done / total, clock + e.seconds * (done + st.steps) / total
        spans.append(
            Span(
                round(start, 3),
                round(end, 3),
                st.forward_flops_fraction,
                st.train_flops_fraction,
                st.step_seconds,
            )
        )
        done += st.steps
    return tuple(spans)


def _phase(rows: list[Row], marks: list[Mark], name: str, part: Metrics | UpdateEntry, start: float) -> float:
    """Add one phase's epochs and drops (starting at wall-clock `start`); returns its end."""
    overhead = max((part.total_seconds or 0.0) - sum(e.seconds for e in part.epochs), 0.0)
    # tracing, data scans and (for an update) the prefix over new images come before the
    # first epoch; the final evaluation after the last is counted there too
    clock = start + (overhead if name != "run" else 0.0)
    begins = {}
    for e in part.epochs:
        begins[e.epoch] = (clock, e.seconds)
        spans = _spans(e, clock)
        clock += e.seconds
        rows.append(
            Row(
                name,
                e.epoch,
                round(clock, 3),
                e.val_acc,
                e.step_seconds,
                e.cut_module or "-",
                e.forward_flops_fraction,
                e.train_loss,
                e.train_flops_fraction,
                spans,
            )
        )
    steps = part.steps_per_epoch
    for d in part.events:
        at, length = begins.get(d.epoch, (clock, 0.0))
        if steps:  # a drop may come within an epoch
            # epochs count from 1
            at += length * min(max(d.step - (d.epoch - 1) * steps, 0) / steps, 1.0)
        marks.append(Mark("drop", round(at, 3), d.where, bool(d.hurt)))
    return start + (part.total_seconds if part.total_seconds is not None else clock - start)


def run_report(out_dir: str | Path) -> RunReport:
    """The story of the run in `out_dir`, its updates included.

    Example:
        >>> r = run_report("runs/demo"); r.final_val_acc, len(r.rows), [m.label for m in r.marks]
    """
    path = Path(out_dir)
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise RunDirError(
            "'{path}' is missing; {report} needs a finished run's folder",
            path=metrics_file,
            report=Entry("run_report", command="report"),
        )
    try:
        metrics = Metrics.from_json(json.loads(metrics_file.read_text()))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"'{metrics_file}' is not valid JSON; the run's story cannot be read") from exc
    try:
        config = RunConfig.from_json(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        config = RunConfig()
    rows: list[Row] = []
    marks: list[Mark] = []
    clock = _phase(rows, marks, "run", metrics, 0.0)
    for i, u in enumerate(metrics.updates, start=1):
        marks.append(Mark("update", round(clock, 3), f"update {i} (+{u.new_samples})"))
        clock = _phase(rows, marks, f"update {i}", u, clock)
    last = metrics.updates[-1] if metrics.updates else metrics
    return RunReport(
        path=path,
        model=config.finetuned.model or "?",
        rows=rows,
        marks=marks,
        final_val_acc=last.final_val_acc,
        total_seconds=clock,
        cache_bytes=last.cache_bytes if last.cache_bytes is not None else metrics.cache_bytes,
        decide_seconds=metrics.decide_seconds + sum(u.decide_seconds for u in metrics.updates),
        updates=list(metrics.updates),
    )


def plot_report(report: RunReport, path: str | Path) -> Path:
    """The story as a PNG against wall-clock: validation accuracy, training loss, the measured
    step and the FLOPs of a step (forward + backward, and forward), both flat over each stretch
    of steps at one cut; drops (red: hurt) and updates marked.

    Example:
        >>> plot_report(run_report("runs/demo"), "runs/demo/report.png")
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 9.5), sharex=True)
    acc_ax, loss_ax, step_ax, flops_ax = axes
    phases = list(dict.fromkeys(r.phase for r in report.rows))
    for i, phase in enumerate(phases):
        _plot_phase(axes, [r for r in report.rows if r.phase == phase], phase, f"C{i}", first=i == 0)
    _plot_marks(axes, report.marks)
    fig.suptitle(f"{report.model}: {report.path}", fontsize=10)
    acc_ax.set(ylabel="val accuracy (%)")
    loss_ax.set(ylabel="training loss")
    step_ax.set(ylabel="step (ms, measured)", ylim=(0, None))
    flops_ax.set(ylabel="FLOPs / step (%)", xlabel="wall-clock (s)", ylim=(0, 105))
    flops_ax.legend(fontsize=7, loc="lower left")
    if len(phases) > 1:
        acc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_phase(axes: Sequence[Any], rows: list[Row], phase: str, color: str, first: bool) -> None:
    """One phase (the fit, or an update) in its colour: accuracy and loss per epoch, the measured
    step and the FLOPs of a step flat over each stretch; the FLOPs' legend from the `first`."""
    acc_ax, loss_ax, step_ax, flops_ax = axes
    acc = [(r.clock_s, 100 * r.val_acc) for r in rows if r.val_acc is not None]
    if acc:
        acc_ax.plot(*zip(*acc), marker="o", color=color, label=phase)
    loss = [(r.clock_s, r.train_loss) for r in rows if r.train_loss is not None]
    if loss:
        loss_ax.plot(*zip(*loss), marker="o", color=color)
    spans = [span for r in rows for span in r.spans]
    xs = [x for sp in spans for x in (sp.start_s, sp.end_s)]  # flat within a stretch, steps between
    step_ax.plot(xs, [1e3 * sp.step_s for sp in spans for _ in (0, 1)], color=color)
    train = [100 * sp.train_flops for sp in spans for _ in (0, 1)]
    flops_ax.plot(xs, train, color=color, label="forward + backward" if first else None)
    forward = [100 * sp.forward_flops for sp in spans for _ in (0, 1)]
    flops_ax.plot(xs, forward, color=color, linestyle="--", label="forward" if first else None)


def _plot_marks(axes: Sequence[Any], marks: list[Mark]) -> None:
    """Drops (red: hurt, else green) and updates (grey) as lines across every panel, each
    labelled above the top one."""
    for ax in axes:
        for m in marks:
            color = "tab:red" if m.hurt else ("tab:green" if m.kind == "drop" else "tab:gray")
            ax.axvline(m.clock_s, color=color, linestyle="--" if m.kind == "drop" else ":", linewidth=1)
    for i, m in enumerate(marks):  # above the top panel, clear of its markers
        axes[0].annotate(
            m.label,
            (m.clock_s, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, 2 + 9 * (i % 2)),  # neighbours alternate in height
            textcoords="offset points",
            rotation=25,
            fontsize=7,
            color="tab:red" if m.hurt else "black",
            va="bottom",
            ha="left",
        )
