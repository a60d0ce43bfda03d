"""`fxdrop.update`: a finished run trains on as images arrive, leave or change; only what is new goes
through the frozen prefix, and what the cache held stays bit for bit."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TINY_CNN, needs_fmnist, run_cli
from PIL import Image
from safetensors.torch import load_file

import fxdrop
from fxdrop.cache import ActivationCache
from fxdrop.data import export_fashion_mnist
from fxdrop.data.folder import _FolderImages
from fxdrop.engine.feeds import Batching

pytestmark = needs_fmnist

SETTINGS = dict(img_size=16, epochs=2, batch_size=32, policy=fxdrop.Fixed(4, 0), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Real Fashion-MNIST PNGs: 200 training and 50 validation images."""
    root = tmp_path_factory.mktemp("fmnist") / "all"
    export_fashion_mnist(str(root), limit=200)
    return root


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(TINY_CNN)
    return f"{path}:build"


def _subset(src: Path, dst: Path, keep: float) -> Path:
    """A copy of `src` with the first `keep` fraction of each training class (val whole)."""
    for split in ("train", "val"):
        for cls in sorted((src / split).iterdir()):
            files = sorted(cls.iterdir())
            (dst / split / cls.name).mkdir(parents=True)
            for f in files[: round(len(files) * keep)] if split == "train" else files:
                shutil.copy2(f, dst / split / cls.name / f.name)
    return dst


@pytest.fixture(scope="module")
def finished(images, spec, tmp_path_factory) -> tuple[Path, Path]:
    """A finished run on 2/3 of the training images, cut at segment 4 from the first epoch."""
    base = _subset(images, tmp_path_factory.mktemp("base") / "data", 2 / 3)
    out = tmp_path_factory.mktemp("run") / "run"
    fxdrop.finetune(spec, str(base), out, **SETTINGS)
    return base, out


def _copy_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


def _train_loads(monkeypatch) -> Counter:
    """Counts, per training image, how often it is read. While training runs from the cache, a
    training image is read only to go through the prefix (once per cached view), besides the two
    the model is traced with at the start."""
    loads: Counter = Counter()
    real = _FolderImages._load

    def load(self, i, key):
        if "/train/" in self.samples[i][0]:
            loads[os.path.relpath(self.samples[i][0], self.root)] += 1
        return real(self, i, key)

    monkeypatch.setattr(_FolderImages, "_load", load)
    return loads


def _prefix_rows(monkeypatch) -> list[int]:
    """Rows that go through a frozen part of the model (one total)."""
    rows: list[int] = []
    real = Batching.frozen

    def frozen(self, fn, x):
        rows[-1:] = [(rows[-1] if rows else 0) + len(x)]
        return real(self, fn, x)

    monkeypatch.setattr(Batching, "frozen", frozen)
    return rows


def _cached(out: Path, split: str = "train") -> dict[int, torch.Tensor]:
    """Every held sample's activations (all views) by key."""
    (folder,) = (out / "cache").glob(f"cut-*/{split}-rank0of1")
    cache = ActivationCache(folder, ActivationCache.read_manifest(folder))
    arrays, gone = cache.load(), set(cache.manifest["removed"])
    return {k: arrays.x[:, r] for r, k in enumerate(arrays.key.tolist()) if k not in gone}


def test_new_images_alone_go_through_the_prefix_and_held_activations_stay_bit_identical(
    finished, images, tmp_path, monkeypatch
):
    out = _copy_run(finished, tmp_path)
    before = _cached(out)
    assert len(before) == 130  # 2/3 of 200, rounded per class
    loads, rows = _train_loads(monkeypatch), _prefix_rows(monkeypatch)
    result = fxdrop.update_folder(out, str(images), epochs=1)
    new = {
        str(p.relative_to(images))
        for p in (images / "train").rglob("*.png")
        if not (finished[0] / p.relative_to(images)).exists()
    }
    assert len(new) == 70
    assert rows == [70 * 2]  # through the frozen prefix: the new images, once per cached view
    assert {p for p, n in loads.items() if n == 2} == new
    assert sum(n == 1 for n in loads.values()) <= 2 and max(loads.values()) == 2  # + the traced ones
    after = _cached(out)
    assert len(after) == 200
    assert all(torch.equal(after[k], x) for k, x in before.items())  # bit-identical
    u = result.update
    assert (u["new_samples"], u["removed_samples"], u["reused_samples"]) == (70, 0, 180)  # 130 train + 50 val
    assert u["cut_before"] == u["cut"] == 4 and not u["rebuilt_cache"]
    metrics = fxdrop.runs.RunDir.finished(out)
    try:
        m = metrics.read_json("metrics.json")
    finally:
        metrics.release()
    assert len(m["updates"]) == 1 and len(m["updates"][0]["epochs"]) == 1 and len(m["epochs"]) == 2
    # the exported model still loads strictly under the original names
    model = fxdrop.create_model(_spec_of(out), num_classes=10)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)


def _spec_of(out: Path) -> str:
    import json

    return json.loads((out / "config.json").read_text())["config"]["extra"]["model"]


def test_removed_images_leave_the_cache_and_a_changed_image_is_recomputed(finished, tmp_path, monkeypatch):
    out = _copy_run(finished, tmp_path)
    data = Path(shutil.copytree(finished[0], tmp_path / "data"))
    classes = sorted((data / "train").iterdir())
    removed = sorted(classes[0].iterdir())[:3]
    for f in removed:
        f.unlink()
    changed = sorted(classes[1].iterdir())[0]
    with Image.open(changed) as im:
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed)  # same path, new content
    before = _cached(out)
    loads, rows = _train_loads(monkeypatch), _prefix_rows(monkeypatch)
    result = fxdrop.update_folder(out, str(data), epochs=1)
    assert rows == [2] and loads[os.path.relpath(changed, data)] == 2  # only the changed image, both views
    u = result.update
    assert (u["new_samples"], u["removed_samples"]) == (1, 4)  # the changed image's old content left too
    after = _cached(out)
    assert len(after) == 130 - 3
    assert len(set(before) - set(after)) == 4 and len(set(after) - set(before)) == 1
    assert all(torch.equal(after[k], before[k]) for k in set(after) & set(before))


def test_a_cached_update_trains_what_an_uncached_update_trains(finished, images, tmp_path):
    cached, uncached = _copy_run(finished, tmp_path / "a"), _copy_run(finished, tmp_path / "b")
    fxdrop.update_folder(cached, str(images), epochs=2)
    fxdrop.update_folder(uncached, str(images), epochs=2, cache=False)
    a, b = load_file(str(cached / "model.safetensors")), load_file(str(uncached / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_new_trains_only_on_new_images(finished, images, tmp_path, monkeypatch):
    out = _copy_run(finished, tmp_path)
    steps = []
    fxdrop.update_folder(
        out,
        str(images),
        epochs=1,
        replay="new",
        batch_size=10,
        on_event=lambda kind, info: steps.append(info["step"]) if kind == "step" else None,
    )
    assert len(steps) == 7  # 70 new images at batch 10 (all 200 would take 20 steps)
    with pytest.raises(fxdrop.DataError, match="no training image is new"):
        fxdrop.update_folder(out, str(images), epochs=1, replay="new")


def test_an_update_after_a_run_without_its_cache_rebuilds_it(finished, images, tmp_path, monkeypatch):
    out = _copy_run(finished, tmp_path)
    shutil.rmtree(out / "cache")
    rows = _prefix_rows(monkeypatch)
    events = []
    result = fxdrop.update_folder(out, str(images), epochs=1, on_event=lambda kind, info: events.append(kind))
    assert rows == [200 * 2 + 50] and result.update["rebuilt_cache"] and "cache_rebuilt" in events
    assert result.update["reused_samples"] == 0


def test_other_class_names_are_one_clear_error(finished, tmp_path):
    out = _copy_run(finished, tmp_path)
    data = Path(shutil.copytree(finished[0], tmp_path / "data"))
    for split in ("train", "val"):
        first = sorted((data / split).iterdir())[0]
        first.rename(first.with_name("zz-renamed"))
    with pytest.raises(fxdrop.DataError, match="same class folders"):
        fxdrop.update_folder(out, str(data), epochs=1)
    assert not (out / "update.pt").exists()


def test_an_unfinished_run_or_a_foreign_folder_cannot_be_updated(images, tmp_path):
    with pytest.raises(fxdrop.RunDirError, match="no finished fxdrop run"):
        fxdrop.update_folder(tmp_path, str(images))
    with pytest.raises(fxdrop.ConfigError, match="replay"):
        fxdrop.update(tmp_path, None, None, replay="some")


def test_the_commands_update_then_report(finished, images, tmp_path):
    out = _copy_run(finished, tmp_path)
    proc = run_cli("update", str(out), "--data", str(images), "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert "70 / 0" in proc.stdout and f"fxdrop report {out}" in proc.stdout  # new / removed; what next
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (
        "update 1" in proc.stdout and "70 new" in proc.stdout and (out / "report.png").stat().st_size > 10_000
    )
    story = fxdrop.run_report(out)
    assert [r.phase for r in story.rows] == ["run", "run", "update 1"]
    bad = run_cli("update", str(out), "--data", str(images), "--replay", "sometimes")
    assert bad.returncode == 1 and "--replay" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_your_own_module_and_datasets_update_through_the_api(tmp_path):
    # reason: datasets without sample_keys() are keyed by position and their listing joins the
    # fingerprint: a changed dataset rebuilds the cache instead of being misread
    from test_fit import small_cnn

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16, generator=g), torch.randint(0, 4, (96,), generator=g)
    train, val = (
        torch.utils.data.TensorDataset(x[:64], y[:64]),
        torch.utils.data.TensorDataset(x[64:], y[64:]),
    )
    fxdrop.fit(
        small_cnn(4), train, val, policy=fxdrop.Fixed(4, 0), epochs=1, batch_size=16, out_dir=tmp_path / "run"
    )
    more = torch.utils.data.TensorDataset(torch.cat([x[:64], x[64:] + 1]), torch.cat([y[:64], y[64:]]))
    with pytest.raises(fxdrop.FxdropError, match="model="):
        fxdrop.update(tmp_path / "run", more, val)  # a fit's run names no model to build
    result = fxdrop.update(tmp_path / "run", more, val, model=small_cnn(4), epochs=1, batch_size=16)
    u = result.update
    assert u["new_samples"] == 32 and u["cut"] == 4  # positions 64-95 are new
    # the changed training set was cached anew (96), the unchanged validation set reused (32)
    assert (u["prefix_samples"], u["reused_samples"]) == (96, 32)
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(state["9.weight"], result.model.state_dict()["9.weight"])
