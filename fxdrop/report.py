"""A run's story at a glance: its epochs and its updates on one wall-clock, with every drop and
update marked, read from the run folder's metrics.json (`fxdrop report OUT`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunDirError

__all__ = ["RunReport", "Row", "Mark", "run_report", "plot_report"]


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
    # (start s, end s, fraction) of each stretch at one cut
    flops_spans: tuple[tuple[float, float, float], ...] = ()


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
        stretches = e.get("stretches") or [{"steps": 1, "forward_flops_fraction": frac}]
        total, done, spans = max(sum(st["steps"] for st in stretches), 1), 0, []
        for st in stretches:  # placed by their share of the epoch's steps, as the drop marks are
            spans.append(
                (
                    round(clock + seconds * done / total, 3),
                    round(clock + seconds * (done + st["steps"]) / total, 3),
                    st["forward_flops_fraction"],
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
    """The story as a PNG: validation accuracy, step time and forward FLOPs per step against
    wall-clock; drops (red: hurt) and updates marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    phases = list(dict.fromkeys(r.phase for r in report.rows))
    for phase in phases:
        rows = [r for r in report.rows if r.phase == phase]
        clock = [r.clock_s for r in rows]
        acc = [(r.clock_s, 100 * r.val_acc) for r in rows if r.val_acc is not None]
        if acc:
            axes[0].plot(*zip(*acc), marker="o", label=phase)
        axes[1].plot(clock, [1e3 * r.step_s for r in rows], marker="o")
        spans = [span for r in rows for span in r.flops_spans]
        xs = [x for a, b, _ in spans for x in (a, b)]
        axes[2].plot(xs, [100 * f for _, _, f in spans for _ in (0, 1)])  # per step: flat within a stretch
    for ax in axes:
        for m in report.marks:
            color = "tab:red" if m.hurt else ("tab:green" if m.kind == "drop" else "tab:gray")
            ax.axvline(m.clock_s, color=color, linestyle="--" if m.kind == "drop" else ":", linewidth=1)
    top = axes[0].get_ylim()[1]
    for m in report.marks:
        axes[0].annotate(m.label, (m.clock_s, top), rotation=90, fontsize=7, va="top", ha="right")
    axes[0].set(ylabel="val accuracy (%)", title=f"{report.model}: {report.path}")
    axes[1].set(ylabel="step (ms)")
    axes[2].set(ylabel="forward FLOPs / step (%)", xlabel="wall-clock (s)", ylim=(0, 105))
    if len(phases) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
