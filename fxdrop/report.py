"""A run's story at a glance: its epochs and its updates on one wall-clock, with every drop and
update marked, read from the run folder's metrics.json (`fxdrop report OUT`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunDirError

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
    updates: list[dict[str, Any]] = field(default_factory=list)  # per update: what it took and reused


def _phase(rows: list[Row], marks: list[Mark], name: str, part: dict[str, Any], start: float) -> float:
    """Add one phase's epochs and drops (starting at wall-clock `start`); returns its end."""
    epochs = part.get("epochs", [])
    overhead = max(part.get("total_seconds", 0.0) - sum(e.get("seconds", 0.0) for e in epochs), 0.0)
    # tracing, data scans and (for an update) the prefix over new images come before the
    # first epoch; the final evaluation after the last is counted there too
    clock = start + (overhead if name != "run" else 0.0)
    begins = {}
    for e in epochs:
        seconds = e.get("seconds", 0.0)
        begins[e["epoch"]] = (clock, seconds)
        frac = e.get("forward_flops_fraction", 1.0)
        train_frac = e.get("train_flops_fraction", frac)
        stretches = e.get("stretches") or [{"steps": 1, "forward_flops_fraction": frac}]
        total, done, spans = max(sum(st["steps"] for st in stretches), 1), 0, []
        for st in stretches:  # placed by their share of the epoch's steps, as the drop marks are
            spans.append(
                Span(
                    round(clock + seconds * done / total, 3),
                    round(clock + seconds * (done + st["steps"]) / total, 3),
                    st["forward_flops_fraction"],
                    # runs made before stretches recorded these: the epoch's
                    st.get("train_flops_fraction", train_frac),
                    st.get("step_seconds", e.get("step_seconds", 0.0)),
                )
            )
            done += st["steps"]
        clock += seconds
        rows.append(
            Row(
                name,
                e["epoch"],
                round(clock, 3),
                e.get("val_acc"),
                e.get("step_seconds", 0.0),
                e.get("cut_module") or "-",
                frac,
                e.get("train_loss"),
                train_frac,
                tuple(spans),
            )
        )
    steps = part.get("steps_per_epoch")
    for d in part.get("events", []):
        at, length = begins.get(d["epoch"], (clock, 0.0))
        if steps:  # a drop may come within an epoch
            # epochs count from 1
            at += length * min(max(d["step"] - (d["epoch"] - 1) * steps, 0) / steps, 1.0)
        marks.append(Mark("drop", round(at, 3), d.get("module") or d.get("node", "?"), bool(d.get("hurt"))))
    return start + part.get("total_seconds", clock - start)


def run_report(out_dir: str | Path) -> RunReport:
    """The story of the run in `out_dir`, its updates included.

    Example:
        >>> r = run_report("runs/demo"); r.final_val_acc, len(r.rows), [m.label for m in r.marks]
    """
    path = Path(out_dir)
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise RunDirError(f"'{metrics_file}' is missing; `fxdrop report` needs a finished run's folder")
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"'{metrics_file}' is not valid JSON; the run's story cannot be read") from exc
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    rows: list[Row] = []
    marks: list[Mark] = []
    clock = _phase(rows, marks, "run", metrics, 0.0)
    updates = []
    for i, u in enumerate(metrics.get("updates", []), start=1):
        marks.append(Mark("update", round(clock, 3), f"update {i} (+{u.get('new_samples', 0)})"))
        clock = _phase(rows, marks, f"update {i}", u, clock)
        updates.append(
            {
                k: u.get(k)
                for k in (
                    "data",
                    "replay",
                    "new_samples",
                    "removed_samples",
                    "reused_samples",
                    "prefix_samples",
                    "prefix_seconds",
                    "rebuilt_cache",
                    "final_val_acc",
                    "total_seconds",
                )
            }
        )
    last = metrics.get("updates", [metrics])[-1]
    return RunReport(
        path=path,
        model=str(config.get("config", {}).get("extra", {}).get("model", "?")),
        rows=rows,
        marks=marks,
        final_val_acc=last.get("final_val_acc", 0.0),
        total_seconds=clock,
        cache_bytes=last.get("cache_bytes", metrics.get("cache_bytes", 0)),
        decide_seconds=metrics.get("decide_seconds", 0.0)
        + sum(u.get("decide_seconds", 0.0) for u in metrics.get("updates", [])),
        updates=updates,
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
        color = f"C{i}"
        rows = [r for r in report.rows if r.phase == phase]
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
        flops_ax.plot(xs, train, color=color, label="forward + backward" if i == 0 else None)
        forward = [100 * sp.forward_flops for sp in spans for _ in (0, 1)]
        flops_ax.plot(xs, forward, color=color, linestyle="--", label="forward" if i == 0 else None)
    for ax in axes:
        for m in report.marks:
            color = "tab:red" if m.hurt else ("tab:green" if m.kind == "drop" else "tab:gray")
            ax.axvline(m.clock_s, color=color, linestyle="--" if m.kind == "drop" else ":", linewidth=1)
    for i, m in enumerate(report.marks):  # above the top panel, clear of its markers
        acc_ax.annotate(
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
