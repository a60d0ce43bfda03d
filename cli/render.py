"""How a command's results look: the cut points as a table, a run's and an update's summary, a
run's story. Each function builds what the command prints; none prints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich import box
from rich.table import Table

import fxdrop
from fxdrop.inspection import ModelReport

from .sizes import mib as _mib


def cut_table(report: ModelReport) -> Table:
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
        where = r.module or r.name
        if r.module and r.name != r.module.replace(".", "_"):  # a node of its own name
            where += f" [dim]({r.name})[/]"
        if r.alternatives:
            where += "\n[dim]= " + ", ".join(a.name for a in r.alternatives) + "[/]"
        row = [
            str(r.index),
            where,
            "x".join(map(str, r.shape)),
            f"{r.bytes_per_sample / 2**10:,.1f}",
            f"{100 * r.prefix_flops_fraction:.1f}%",
            f"{r.suffix_params:,}",
        ]
        if report.cost:
            pays = r.pays_after_epochs
            row += [
                f"{r.step_ms:,.1f}",
                f"{r.freeze_only_step_ms:,.1f}",
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
    table.caption = _cut_caption(report)
    return table


def _cut_caption(report: ModelReport) -> str:
    """What each column of the cut table is."""
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
    return caption


def finetune_summary(model: str, out: Path, result: fxdrop.FitResult) -> Table:
    """A finished run in numbers: time, accuracy, drops, FLOPs saved, sizes."""
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
    return table


def update_summary(out: Path, result: fxdrop.FitResult) -> Table:
    """An update in numbers: what was new, what was reused, what ran through the prefix."""
    u = result.update
    table = Table(title=f"fxdrop update {out} (update {u.update})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("images new / removed", f"{u.new_samples} / {u.removed_samples}")
    table.add_row("activations reused from the cache", str(u.reused_samples))
    if u.reclaimed_bytes:
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
    return table


def story_table(out: Path, story: fxdrop.RunReport) -> Table:
    """A run's story, one row per epoch (updates in sections of their own), drops marked."""
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
    return table


def story_lines(story: fxdrop.RunReport) -> Iterator[str]:
    """The lines under the story's table: each update, then the run's totals."""
    for i, u in enumerate(story.updates, start=1):
        yield (
            f"update {i}: {u.new_samples} new, {u.removed_samples} removed, {u.reused_samples} "
            f"activations reused, {u.prefix_samples} through the prefix in {u.prefix_seconds:.1f} s"
            + (" (cache rebuilt)" if u.rebuilt_cache else "")
        )
    yield (
        f"final val accuracy {100 * story.final_val_acc:.2f}%; {story.total_seconds:.1f} s in all; "
        f"cache {_mib(story.cache_bytes)}; decisions {story.decide_seconds:.2f} s"
    )
