"""The records that leave the process: each goes through JSON and back unchanged, a metrics.json
written before the records existed reads back (and is written again as it was), a run writes the
keys it always wrote, and the engine and the screen read them by type."""

from __future__ import annotations

import copy
import inspect
import json

import torch
from torch import nn
from torch.utils.data import TensorDataset

import fxdrop
from fxdrop import records as R
from fxdrop.engine.run_records import _judge_drops

# A metrics.json as fxdrop wrote it before the records existed (the dict literals of engine/loop.py,
# dropper.py and update_run.py at c285d66): a Fixed drop run's file, with a declined drop, a cache
# build, a cache rebuild, validation at chance, an early stop and an update filled in by hand with
# the keys those wrote.
_DROP = {
    "epoch": 2,
    "step": 4,
    "cut": 2,
    "node": "_2",
    "module": "2",
    "cache_seconds": 0.047,
    "cache_bytes": 1315400,
    "cache_tier": "memory",
    "cache_dtype": "fp32",
    "cache_dtype_why": "fp32 as asked, 1 MiB in host memory (room for 8.5 GiB)",
    "why": {"fixed_cut": 2, "done_before": False, "rule": "fixed at epoch 1", "decide_seconds": 0.0},
    "forward_flops_fraction": 0.8421196893558702,
    "frozen_params": 240,
    "removed_from_optimizer": 4,
    "cached": True,
    "val_acc_before": 0.25,
    "val_acc_after": 0.25,
    "val_noise": 0.0765,
    "hurt": False,
}
_EPOCHS = [
    {
        "epoch": 1,
        "train_loss": 1.388776957988739,
        "train_seconds": 0.043,
        "step_seconds": 0.010609,
        "data_seconds": 0.002,
        "forward_flops_fraction": 1.0,
        "train_flops_fraction": 1.0,
        "stretches": [
            {
                "cut": -1,
                "cached": False,
                "steps": 4,
                "step_seconds": 0.010609,
                "forward_flops_fraction": 1.0,
                "train_flops_fraction": 1.0,
            }
        ],
        "val_acc": 0.25,
        "val_loss": 1.4101459980010986,
        "seconds": 0.051,
        "cut": -1,
        "cut_module": None,
        "lr": 0.005653178107421711,
    },
    {
        "epoch": 2,
        "train_loss": 1.388364851474762,
        "train_seconds": 0.018,
        "step_seconds": 0.004265,
        "data_seconds": 0.0,
        "forward_flops_fraction": 0.8421196893558702,
        "train_flops_fraction": 0.8421196893558701,
        "stretches": [
            {
                "cut": 2,
                "cached": True,
                "steps": 4,
                "step_seconds": 0.004265,
                "forward_flops_fraction": 0.8421196893558702,
                "train_flops_fraction": 0.8421196893558701,
            }
        ],
        "val_acc": 0.25,
        "val_loss": 1.4096901416778564,
        "seconds": 0.073,
        "cut": 2,
        "cut_module": "2",
        "lr": 0.0021593218925782896,
    },
]
_DECLINED = {
    "epoch": 1,
    "step": 2,
    "kept": -1,
    "allowed": 1,
    "rule": "forecast",
    "decision": "declined: saves 0.1% < MIN_GAIN",
    "decide_seconds": 0.002,
}
_BUILD = {k: v for k, v in _DROP.items() if k not in list(_DROP)[11:]} | {"epoch": 3, "step": 8}
_REBUILD = {
    "step": 0,
    "cut": 2,
    "folder": "cache/cut2-_2-train",
    "check": "sha256",
    "file": "shard-00000.safetensors",
    "detail": "the hash differs",
    "samples": 64,
}
OLD_METRICS = {
    "epochs": _EPOCHS,
    "events": [_DROP],
    "total_seconds": 0.27799299899925245,
    "final_val_acc": 0.25,
    "best_epoch": 1,
    "best_val_acc": 0.25,
    "stopped_early": {"after_epoch": 2, "best_epoch": 1, "patience": 1, "reason": "1 validated epochs ..."},
    "cache_bytes": 1315400,
    "world_size": 1,
    "declined_drops": [_DECLINED],
    "steps_per_epoch": 4,
    "forward_flops_fraction": 0.8947464595705802,
    "train_flops_fraction": 0.89474645957058,
    "checkpoint_bytes": 43837,
    "no_drop": None,
    "decide_seconds": 0.002,
    "cache_build_seconds": 0.094,
    "cache_builds": [_BUILD],
    "cache_rebuilds": [_REBUILD],
    "val_at_chance": {
        "epoch": 2,
        "val_acc": 0.25,
        "chance": 0.25,
        "train_loss_first": 1.3888,
        "train_loss": 1.3884,
        "bn_momentum": 0.01,
        "why": "validation accuracy 25.00% is chance ...",
    },
    "frozen_at_start": [],
    "landings": [
        {
            "kind": "landing",
            "epoch": 1,
            "step": 0,
            "segments": [0, 1],
            "modules": ["0", "1"],
            "ends_at_step": 4,
        },
        {
            "kind": "landing_cancelled",
            "epoch": 1,
            "step": 2,
            "segments": [1],
            "modules": ["1"],
            "ends_at_step": None,
        },
    ],
    "step_costs": None,
    "policy": {"name": "Fixed", "cut": 2, "epoch": 1, "observations": {}},
    "updates": [
        {
            "update": 1,
            "data": "images-week-2",
            "replay": "new",
            "new_samples": 40,
            "removed_samples": 2,
            "reused_samples": 300,
            "reclaimed_bytes": 2048,
            "prefix_samples": 40,
            "prefix_seconds": 0.5,
            "rebuilt_cache": False,
            "cut_before": 2,
            "cut": 2,
            "epochs": [_EPOCHS[1] | {"epoch": 1}],
            "events": [],
            "final_val_acc": 0.3,
            "total_seconds": 1.5,
            "cache_bytes": 1400000,
            "decide_seconds": 0.0,
            "declined_drops": [],
            "steps_per_epoch": 4,
            "cache_rebuilds": [],
        }
    ],
}


def _through_json(data):
    return json.loads(json.dumps(data))


def _keys(obj, at=""):
    """Every key path of a JSON object, in order (a list's first item stands for all)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in [f"{at}/{k}", *_keys(v, f"{at}/{k}")]]
    if isinstance(obj, list) and obj:
        return _keys(obj[0], f"{at}[]")
    return []


def test_a_metrics_file_written_before_the_records_reads_back_and_is_written_again_as_it_was():
    metrics = R.Metrics.from_json(copy.deepcopy(OLD_METRICS))
    assert metrics.to_json() == OLD_METRICS
    assert _keys(metrics.to_json()) == _keys(OLD_METRICS)  # the same keys, in the same order
    # read by type, each where the old file kept it
    (drop,) = metrics.events
    assert (drop.cut, drop.where, drop.hurt, drop.val_noise) == (2, "2", False, 0.0765)
    assert metrics.epochs[1].stretches[0] == R.Stretch(
        2, True, 4, 0.004265, 0.8421196893558702, 0.8421196893558701
    )
    assert (
        metrics.declined_drops[0].decision.startswith("declined")
        and metrics.declined_drops[0].decide_seconds == 0.002
    )
    assert [type(e) for e in metrics.landings] == [R.Landing, R.LandingCancelled]
    assert metrics.stopped_early.after_epoch == 2 and metrics.val_at_chance.bn_momentum == 0.01
    assert metrics.cache_builds[0].epoch == 3 and metrics.cache_rebuilds[0].check == "sha256"
    (update,) = metrics.updates
    assert (update.replay, update.reused_samples, update.epochs[0].cut) == ("new", 300, 2)


def test_an_older_file_lacking_later_keys_takes_the_defaults_of_its_time():
    """Runs made before stretches, training FLOPs, validation loss, best epochs and landings were
    recorded: a stretch takes its epoch's training FLOPs and mean step; what is missing is None or
    empty, and unknown keys are kept and written back."""
    epoch = {"epoch": 1, "seconds": 10.0, "val_acc": 0.5, "step_seconds": 0.2, "forward_flops_fraction": 0.5}
    old = {
        "epochs": [
            epoch | {"stretches": [{"cut": 3, "cached": True, "steps": 5, "forward_flops_fraction": 0.5}]}
        ],
        "events": [{"epoch": 1, "step": 3, "cut": 3, "module": "layer2"}],
        "total_seconds": 12.0,
        "a_key_from_elsewhere": {"kept": True},
    }
    metrics = R.Metrics.from_json(old)
    (e,) = metrics.epochs
    assert e.train_flops_fraction == 0.5 and e.train_loss is None and e.val_loss is None and e.lr is None
    assert e.stretches[0].train_flops_fraction == 0.5 and e.stretches[0].step_seconds == 0.2
    assert metrics.events[0].hurt is None and not metrics.events[0].judged
    assert metrics.best_epoch is None and metrics.landings == [] and metrics.updates == []
    assert metrics.extra == {"a_key_from_elsewhere": {"kept": True}}
    assert metrics.to_json()["a_key_from_elsewhere"] == {"kept": True}
    assert "updates" not in metrics.to_json()  # a run without updates writes none, as before


def _examples() -> list[R.Record]:
    """One of every record, fields away from their defaults."""
    stretch = R.Stretch(3, False, 7, 0.25, 1.0, 0.6)
    epoch = R.Epoch(2, 1.25, 3.5, 0.4, 0.1, 0.7, 0.65, [stretch], 0.8, 0.5, 4.0, 3, "layer2", 0.01)
    drop = R.Drop(2, 9, 3, "layer2_1", "layer2", 1.5, 1 << 20, "disk", "bf16", "bf16: fits", {"rule": "x"})
    judged = R.Drop(
        2, 9, 3, "n", "m", forward_flops_fraction=0.4, cached=False, val_acc_after=0.7, hurt=False
    )
    declined = R.Declined(1, 2, -1, 4, {"decision": "no saving", "decide_seconds": 0.01})
    build = R.CacheBuild(3, 12, 3, "n", "m", 2.0, 4096, "memory", why={"rent": 1.0})
    rebuilt = R.CacheRebuilt(0, 3, "f", "manifest", "manifest.json", "unreadable", 64)
    landing = R.Landing(1, 0, [0, 1], ["a", "b"], 8)
    cancelled = R.LandingCancelled(2, 5, [1], ["b"])
    chance = R.ValAtChance(2, 0.1, 0.1, 2.3, 1.6, None, "why")
    stopped = R.StoppedEarly(5, 3, 2, "reason")
    update = R.UpdateEntry(1, "d", "new", 4, 1, 3, 0, 4, 0.2, True, 3, 5, [epoch], [drop], 0.9, 2.0, 10, 0.1)
    metrics = R.Metrics(
        [epoch], [judged], 9.0, 0.9, 2, 0.8, stopped, 10, 2, [declined], 7, 0.7, 0.6, 99, None, 0.1, 2.0,
        [build], [rebuilt], chance, ["stem"], [landing, cancelled], {"cut": 3}, {"name": "LearnDrop"},
        [update],
    )  # fmt: skip
    progress = [
        R.ImgSize([32, 48], "asked for", "small"),
        R.DataSummary("fashion-mnist", 100, 25, 10, 1),
        R.Weights("loaded 10 tensors"),
        R.NoResume("nothing to resume"),
        R.EpochStart(1, 3, 10, -1),
        R.Step(1, 2, 10, 0.5),
        R.CacheProgress("train", 0, 32, 64),
        R.Checkpoint(1, 1234),
        R.NoDrop("not learned yet", 2),
        R.CacheGone(3, 100),
        R.Exported("fm", 50, 12, {"train": {"a": 25, "b": 25}, "val": {"a": 6, "b": 6}}),
    ]
    made = R.Finetuned("timm:resnet18", "fashion-mnist", 32, 200, ["a", "b"], 1, None, True, False)
    run_config = R.RunConfig(
        "fxdrop-run", 1, {"seed": 3}, {"seed": 3, "extra": made.to_json()}, {"lr": 0.1}, {}
    )
    progress += [made, run_config]
    alternative = R.CutAlternative(4, "layer2_1_relu", "layer2.1.relu")
    rows = [
        R.CutRow(3, "layer2_1", "layer2.1", [64, 8, 8], 16384, 10, 30, 5, 7, 0.25, [alternative]),
        R.CutRow(5, "n", "m", [8], 32, 1, 2, 3, 4, 0.3, [], 1.5, 2.5, 4.0, None),  # measured: never pays
    ]
    kept = [stretch, epoch, drop, judged, declined, build, rebuilt, landing, cancelled, chance, stopped]
    return [*kept, update, metrics, *rows, alternative, *progress]


def test_every_record_goes_through_json_and_back_unchanged():
    examples = _examples()
    kinds = {
        cls
        for _, cls in inspect.getmembers(R, inspect.isclass)
        if issubclass(cls, R.Record) and cls is not R.Record and not cls.__name__.startswith("_")
    }
    assert kinds <= {type(r) for r in examples}, kinds - {type(r) for r in examples}
    for record in examples:
        data = _through_json(record.to_json())
        back = type(record).from_json(data)
        assert back == record, type(record).__name__
        assert back.to_json() == data and back.extra == {}


def test_a_config_json_from_before_the_format_marker_reads_and_is_written_again_as_it_was():
    """config.json as fxdrop wrote it before its "format" marker and "resolved" (keys identity,
    config, policy), its finetune notes as `finetune` recorded them."""
    notes = {
        "model": "timm:resnet18",
        "data": "/data/images",
        "img_size": 64,
        "limit": None,
        "classes": ["cat", "dog"],
        "skipped_images": 0,
        "weights": None,
        "pretrained": True,
        "augment": True,
    }
    old = {
        "identity": {"seed": 0, "model": "timm:resnet18"},
        "config": {"epochs": 3, "seed": 7, "extra": notes},
        "policy": {"name": "LearnDrop"},
    }
    config = R.RunConfig.from_json(copy.deepcopy(old))
    assert config.to_json() == old and list(config.to_json()) == list(old)
    assert config.finetuned.to_json() == notes and config.finetuned.classes == ["cat", "dog"]
    assert config.seed == 7 and config.settings == {"epochs": 3, "seed": 7}
    assert R.RunConfig.from_json({"config": {}}).finetuned.model is None  # a run of your own module


def test_an_inspect_row_has_cost_keys_only_when_the_costs_were_measured():
    unmeasured, measured = (r for r in _examples() if isinstance(r, R.CutRow))
    assert "pays_after_epochs" not in unmeasured.to_json() and "step_ms" not in unmeasured.to_json()
    assert measured.to_json()["pays_after_epochs"] is None  # measured: a cache never pays


def test_a_record_reads_as_the_json_object_it_writes():
    """`FitResult.events[0]["cut"]` and `on_event` infos keep reading as they did."""
    drop = R.Drop(2, 9, 3, module="layer2")
    assert drop["cut"] == 3 and drop.get("module") == "layer2" and "hurt" not in drop
    assert dict(drop) == drop.to_json() and "cache_dtype" not in drop  # no cache placed: no format keys


def test_a_drop_is_judged_by_the_validation_after_it_against_the_one_before():
    """Hand-built: 1000 validation samples at 0.8 before the drop (noise sqrt(0.8 x 0.2 / 1000) =
    0.0126): 0.7 after hurts, 0.79 does not; a drop before any validation is judged not hurt."""
    history = [R.Epoch(1, val_acc=0.8), R.Epoch(2, val_acc=None)]
    events = [R.Drop(2, 20, 3), R.Drop(3, 30, 4)]
    first = events[0]
    _judge_drops(events, history, R.Epoch(3, val_acc=0.7), 1000)
    assert [e.hurt for e in events] == [True, True] and events[0].val_noise == 0.0126
    assert first.hurt is None  # the record emitted at the drop is not changed; the list's is replaced
    events = [R.Drop(2, 20, 3)]
    _judge_drops(events, history, R.Epoch(3, val_acc=0.79), 1000)
    assert events[0].hurt is False and events[0].val_acc_before == 0.8
    events = [R.Drop(1, 0, 3)]
    _judge_drops(events, [], R.Epoch(1, val_acc=0.1), 1000)
    assert events[0].hurt is False and "val_acc_before" not in events[0].to_json()
    judged = list(events)
    _judge_drops(events, [R.Epoch(1, val_acc=0.1)], R.Epoch(2, val_acc=0.0), 1000)
    assert events == judged  # judged once, by the first validation after it


def test_a_run_writes_the_keys_it_always_wrote_and_reports_records_by_type(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16), torch.randint(0, 4, (96,))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    seen = []
    result = fxdrop.fit(
        model,
        TensorDataset(x[:64], y[:64]),
        TensorDataset(x[64:], y[64:]),
        policy=fxdrop.Fixed(2, 1),
        epochs=3,
        batch_size=16,
        cache_dtype="fp32",
        out_dir=tmp_path,
        on_event=lambda kind, record: seen.append((kind, record)),
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert list(written) == [k for k in OLD_METRICS if k != "updates"]  # a run without updates
    for key in ("epochs", "events", "landings"):  # the records this run made, keyed as before
        assert _keys(written[key]) == _keys(OLD_METRICS[key]), key
    assert R.Metrics.from_json(written).to_json() == written
    assert all(kind == record.kind for kind, record in seen)
    kinds = {type(record) for _, record in seen}
    assert {R.EpochStart, R.Step, R.Epoch, R.Drop, R.Landing, R.CacheProgress, R.Checkpoint} <= kinds
    (drop,) = [record for kind, record in seen if kind == "drop"]
    assert drop.cut == result.events[0].cut == written["events"][0]["cut"] and result.events[0].judged
    epochs = [record for kind, record in seen if kind == "epoch_end"]
    assert epochs == result.history and [e.to_json() for e in epochs] == written["epochs"]
