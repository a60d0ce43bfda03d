"""The run folder and the cache store: what is refused, what is removed, what is kept; `fit`
refuses bad configuration before anything is traced or written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import needs_fmnist
from test_fit import _fit, fmnist  # noqa: F401 (fixture)

import fxdrop
from fxdrop.cache import ActivationCache, CacheStore
from fxdrop.runs import RunDir

pytestmark = needs_fmnist


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"cache_dtype": "fp64"}, "cache_dtype"),
        ({"cache_views": 0}, "cache_views"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"cache_tier": "ssd"}, "cache_tier"),
        ({"epoch": 3}, "epoch"),
    ],
)
def test_bad_configuration_is_refused_before_anything_is_written(fmnist, tmp_path, bad, field):  # noqa: F811
    with pytest.raises(fxdrop.ConfigError) as info:
        _fit(fmnist, fxdrop.NoDrop(), tmp_path, "run", **bad)
    assert info.value.field == field and f"`{field}`" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_diverging_training_stops_at_once_keeps_the_last_checkpoint_and_exports_nothing(fmnist, tmp_path):  # noqa: F811
    with pytest.raises(fxdrop.DivergedError, match="diverged"):
        _fit(fmnist, fxdrop.NoDrop(), tmp_path, "run", lr=1e12)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_overwrite_checks_everything_before_deleting_and_removes_only_fxdrops_files(fmnist, tmp_path):  # noqa: F811
    _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "run", epochs=1, keep_cache=True)
    run = tmp_path / "run"
    ours = ["config.json", "metrics.json", "model.safetensors", "checkpoint.pt"]
    assert all((run / n).exists() for n in ours) and list((run / "cache").glob("cut-*/*/manifest.json"))
    foreign = run / "cache" / "notes.txt"
    foreign.write_text("mine")
    with pytest.raises(fxdrop.CacheError, match="notes.txt"):
        _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "run", epochs=1, overwrite=True)
    assert all((run / n).exists() for n in ours)  # nothing was deleted before the refusal
    foreign.unlink()
    (run / "mine.txt").write_text("mine")
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a killed write's leftover
    RunDir(run, {}, overwrite=True, store=CacheStore(run / "cache", owns_root=True)).release()
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]  # the lock file goes with the lock


def test_a_users_config_json_is_never_taken_for_a_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"learning_rate": 3}))
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(fxdrop.RunDirError, match="not written by fxdrop"):
            RunDir(tmp_path, {}, **flags)
    assert json.loads((tmp_path / "config.json").read_text()) == {"learning_rate": 3}


def test_a_run_folder_in_use_is_refused_naming_the_process(tmp_path):
    first = RunDir(tmp_path / "run", {})
    with pytest.raises(fxdrop.FxdropError, match=f"in use by process {os.getpid()}"):
        RunDir(tmp_path / "run", {})
    first.release()
    RunDir(tmp_path / "run", {}).release()


def test_a_cache_with_another_fingerprint_is_rebuilt_not_used(tmp_path):
    base = {
        "prefix_code": "def forward(x): ...",
        "prefix_state": {"w": torch.ones(3)},
        "cut_name": "layer1",
        "data": "d",
        "views": 2,
    }
    store = CacheStore(tmp_path, torch.float32)
    fp = store.fingerprint(**base)
    changed = [
        store.fingerprint(**(base | {"prefix_state": {"w": torch.ones(3) * 2}})),
        store.fingerprint(**(base | {"cut_name": "layer2"})),
        CacheStore(tmp_path, torch.bfloat16).fingerprint(**base),
        CacheStore(tmp_path, torch.float32, rank=0, world_size=2).fingerprint(**base),
    ]
    assert len({fp, *changed}) == 5
    folder = store.folder(3, "layer1", "train")
    blocks = [(torch.randn(4, 2), torch.zeros(4), torch.arange(4), 0)]
    keys, cpu = torch.arange(4), torch.device("cpu")
    _, _, reuse = store.open_or_extend(folder, fp, keys, lambda pos: iter(blocks), "memory", cpu, "train")
    assert (reuse.new, reuse.reused) == (4, 0)
    _, _, reuse = store.open_or_extend(folder, fp, keys, lambda pos: iter(blocks), "memory", cpu, "train")
    assert (reuse.new, reuse.reused) == (0, 4)  # reused
    for other in changed:
        assert ActivationCache.open(folder, other) is None
        _, _, reuse = store.open_or_extend(
            folder, other, keys, lambda pos: iter(blocks), "memory", cpu, "train"
        )
        assert reuse.new == 4  # rebuilt


def test_metrics_json_is_strict_json(fmnist, tmp_path):  # noqa: F811
    _fit(fmnist, fxdrop.LearnDrop(left=float("inf")), tmp_path, "run", epochs=1)  # an infinite setting
    text = (tmp_path / "run" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert oct((tmp_path / "run" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_empty_cache_folder_the_user_made_is_kept(fmnist, tmp_path):  # noqa: F811
    mine = tmp_path / "my-cache"
    mine.mkdir()
    _fit(fmnist, fxdrop.Fixed(4, 0), tmp_path, "run", epochs=1, cache_dir=str(mine), keep_cache=False)
    assert mine.is_dir() and [p.name for p in mine.iterdir()] in ([], [".fxdrop.lock"])
