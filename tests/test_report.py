"""`fxdrop report`: a run's epochs and updates on one wall-clock, drops and updates marked."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import fxdrop
from fxdrop.records import Drop, Epoch, Metrics, Stretch, UpdateEntry
from fxdrop.runs import RunDir


def _epoch(e, seconds, acc, cut=None, frac=1.0):
    return Epoch(
        e,
        seconds=seconds,
        val_acc=acc,
        step_seconds=0.1,
        cut_module=cut,
        forward_flops_fraction=frac,
        train_flops_fraction=frac,
    )


@pytest.fixture
def story(tmp_path):
    """A hand-made run: 3 epochs of 10 s (12 s in all), a drop in the middle of its 2nd epoch; two
    updates, each with 1 s before its epochs (data scan, prefix), the first with a hurtful drop.
    Written as a run writes it (`RunDir.write_metrics`), read back by `run_report`."""
    first = UpdateEntry(
        1,
        new_samples=40,
        removed_samples=2,
        reused_samples=300,
        prefix_samples=40,
        prefix_seconds=0.5,
        steps_per_epoch=4,
        total_seconds=9.0,
        final_val_acc=0.72,
        decide_seconds=0.5,
        epochs=[_epoch(1, 4, 0.71, "layer2", 0.5), _epoch(2, 4, 0.72, "layer3", 0.3)],
        events=[Drop(2, 4, 5, module="layer3", val_acc_before=0.71, val_acc_after=0.6, hurt=True)],
    )
    second = UpdateEntry(
        2,
        new_samples=10,
        reused_samples=340,
        prefix_samples=10,
        prefix_seconds=0.1,
        total_seconds=3.0,
        final_val_acc=0.74,
        epochs=[_epoch(1, 2, 0.74, "layer3", 0.3)],
        cache_bytes=150,
    )
    metrics = Metrics(
        epochs=[_epoch(1, 10, 0.5), _epoch(2, 10, 0.6, "layer2", 0.5), _epoch(3, 10, 0.7, "layer2", 0.5)],
        events=[Drop(2, 15, 3, module="layer2")],
        steps_per_epoch=10,
        total_seconds=32.0,
        final_val_acc=0.7,
        cache_bytes=100,
        decide_seconds=0.25,
        updates=[first, second],
    )
    _written(tmp_path, metrics)
    return fxdrop.run_report(tmp_path)


def _written(folder, metrics):
    """`metrics` in `folder` as a run leaves them (its config.json names the model)."""
    run = RunDir(folder, {})
    try:
        run.write_metrics(metrics)
    finally:
        run.release()
    (folder / "config.json").write_text(json.dumps({"config": {"extra": {"model": "timm:resnet18"}}}))


def test_the_run_and_its_updates_share_one_wall_clock(story):
    assert [(r.phase, r.epoch) for r in story.rows] == [
        ("run", 1),
        ("run", 2),
        ("run", 3),
        ("update 1", 1),
        ("update 1", 2),
        ("update 2", 1),
    ]
    # the run: 10, 20, 30; update 1 starts at the run's 32 s, 1 s of overhead, then 4 s epochs
    assert [r.clock_s for r in story.rows] == [10, 20, 30, 37, 41, 44]
    assert story.total_seconds == 32 + 9 + 3
    assert story.final_val_acc == 0.74 and story.cache_bytes == 150 and story.decide_seconds == 0.75


def test_drops_and_updates_are_marked_where_they_happened(story):
    marks = [(m.kind, m.clock_s, m.label, m.hurt) for m in story.marks]
    assert ("drop", 15.0, "layer2", False) in marks  # step 15: half-way through the 2nd epoch (10 to 20 s)
    assert ("drop", 37.0, "layer3", True) in marks  # at the start of update 1's 2nd epoch
    assert ("update", 32.0, "update 1 (+40)", False) in marks and (
        "update",
        41.0,
        "update 2 (+10)",
        False,
    ) in marks
    assert [u.new_samples for u in story.updates] == [40, 10]


def test_the_picture_is_a_png(story, tmp_path):
    path = fxdrop.plot_report(story, tmp_path / "story.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_folder_without_a_finished_run_is_one_clear_error(tmp_path):
    with pytest.raises(fxdrop.RunDirError, match="metrics.json"):
        fxdrop.run_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(fxdrop.RunDirError, match="not valid JSON"):
        fxdrop.run_report(tmp_path)


def test_a_freeze_only_drop_shows_in_the_step_cost_not_in_the_forward_flops(tmp_path):
    """An epoch of 10 steps (10 s): 5 steps on the whole model at 0.8 s, then a freeze-only drop
    whose 5 steps take 0.3 s; its forward FLOPs stay at 100%, its training FLOPs fall."""
    epoch = replace(
        _epoch(1, 10, 0.5),
        train_loss=1.5,
        train_flops_fraction=0.75,
        stretches=[Stretch(-1, False, 5, 0.8, 1.0, 1.0), Stretch(3, False, 5, 0.3, 1.0, 0.5)],
    )
    _written(tmp_path, Metrics(epochs=[epoch, _epoch(2, 10, 0.6, "layer2", 0.5)], total_seconds=20.0))
    story = fxdrop.run_report(tmp_path)
    first, second = story.rows
    assert first.train_loss == 1.5 and second.train_loss is None  # a run that recorded none
    assert [(s.start_s, s.end_s, s.step_s, s.forward_flops, s.train_flops) for s in first.spans] == [
        (0.0, 5.0, 0.8, 1.0, 1.0),
        (5.0, 10.0, 0.3, 1.0, 0.5),
    ]
    # an epoch without stretches (an older run) is one span: its mean step, its FLOPs (forward: cached)
    assert [(s.start_s, s.end_s, s.step_s, s.train_flops) for s in second.spans] == [(10.0, 20.0, 0.1, 0.5)]
    assert fxdrop.plot_report(story, tmp_path / "story.png").read_bytes()[:4] == b"\x89PNG"
