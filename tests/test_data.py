"""Data: Fashion-MNIST from IDX files, ImageFolder trees, per-(seed, view, index) augmentation, errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import HAVE_FMNIST, needs_fmnist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from fxdrop.data import (
    FASHION_MNIST_CLASSES,
    build_data,
    class_balanced_indices,
    export_fashion_mnist,
    load_fashion_mnist,
)
from fxdrop.errors import DataError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def fmnist():
    """The full Fashion-MNIST bundle at 32 px (built once: about 0.5 s)."""
    return build_data("fashion-mnist", 32, seed=0)


def make_folder(root: Path, layout: dict[str, dict[str, int]], size: tuple[int, int] = (40, 30)) -> Path:
    """An ImageFolder tree of random PNGs: layout = {split: {class: count}}. Odd images are grayscale."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                if k % 2:
                    arr = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)  # grayscale
                else:
                    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k:03d}.png")
    return root


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------


@needs_fmnist
def test_idx_reading():
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert sorted(torch.unique(yt).tolist()) == list(range(10))
    assert yt[:3].tolist() == [9, 2, 1]  # the well-known first test labels: ankle boot, pullover, trouser
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


@needs_fmnist
def test_fashion_bundle_shapes_and_normalisation(fmnist):
    assert len(fmnist.train) == 60000 and len(fmnist.val) == 10000
    assert fmnist.classes == FASHION_MNIST_CLASSES and fmnist.source == "fashion-mnist"
    assert fmnist.skipped == 0 and fmnist.num_classes == 10
    x, y = fmnist.val[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # val: resize + normalise, nothing random; recompute it by hand
    raw, labels = load_fashion_mnist("test")
    ref = F.interpolate(
        raw[5].float().div(255)[None, None], size=(32, 32), mode="bilinear", align_corners=False
    )[0]
    ref = (ref - IMAGENET_MEAN) / IMAGENET_STD  # (3, 32, 32)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)  # bilinear vs antialiased kernel (upscale)
    assert y == labels[5].item()
    assert torch.equal(fmnist.val.labels, labels)
    # all three channels carry the same grayscale image
    gray = x * IMAGENET_STD + IMAGENET_MEAN
    torch.testing.assert_close(gray[0], gray[1], rtol=0, atol=1e-6)  # (x-m)/s*s+m round-off
    # train samples: same shape, augmented
    xt, _ = fmnist.train[0]
    assert xt.shape == (3, 32, 32) and xt.dtype == torch.float32


@needs_fmnist
def test_fashion_model_mean_std_and_downscale():
    model = nn.Conv2d(3, 4, 3)
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}  # as timm models carry
    b = build_data("fashion-mnist", 14, model=model, limit=20)
    x, _ = b.val[0]
    assert x.shape == (3, 14, 14)
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (p - 0.5) / 0.25 for p in [0, 1]
    assert x.min() < -1.9  # the black background


@needs_fmnist
def test_augmentation_is_a_function_of_seed_view_index(fmnist):
    ds = fmnist.train
    other = build_data("fashion-mnist", 32, seed=0).train  # separately built
    for i in (0, 1, 12345, 59999):
        for v in (0, 1, 7):
            assert torch.equal(ds.get(i, v)[0], other.get(i, v)[0])
    # the global RNGs play no part
    torch.manual_seed(123)
    random.seed(5)
    a = ds.get(3, 2)[0]
    torch.rand(100)
    assert torch.equal(ds.get(3, 2)[0], a)
    # views differ (crop offsets and flip come from 64 hash bits; 1 in 162 draws repeats per view)
    n = 200
    same = sum(torch.equal(ds.get(i, 0)[0], ds.get(i, 1)[0]) for i in range(n))
    assert same < n // 10
    # set_view picks what __getitem__ returns
    ds.set_view(4)
    try:
        assert torch.equal(ds[10][0], ds.get(10, 4)[0])
    finally:
        ds.set_view(0)
    # another seed gives other views
    other_seed = build_data("fashion-mnist", 32, seed=1, limit=None).train
    assert sum(torch.equal(ds.get(i, 0)[0], other_seed.get(i, 0)[0]) for i in range(n)) < n // 10
    # validation ignores views
    assert torch.equal(fmnist.val.get(3, 0)[0], fmnist.val.get(3, 9)[0])


@needs_fmnist
def test_no_augment_ignores_views():
    b = build_data("fashion-mnist", 32, limit=50, augment=False)
    assert torch.equal(b.train.get(0, 0)[0], b.train.get(0, 5)[0])
    assert not b.train.augment


@needs_fmnist
def test_sample_index_out_of_range_is_an_index_error(fmnist):
    assert torch.equal(fmnist.train[-1][0], fmnist.train[59999][0])
    with pytest.raises(IndexError):
        fmnist.train[60000]


@needs_fmnist
def test_dataloader_workers_match_main_process():
    ds = build_data("fashion-mnist", 32, limit=64, seed=3).train
    ds.set_view(2)
    ref = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, ref)
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers get a pickled copy
    assert torch.equal(clone[7][0], ref[7])


@needs_fmnist
def test_limit_is_class_balanced():
    b = build_data("fashion-mnist", 32, limit=100, seed=0)
    assert len(b.train) == 100 and torch.bincount(b.train.labels).tolist() == [10] * 10
    assert len(b.val) == 25  # max(100 // 4, 10)
    counts = torch.bincount(b.val.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    again = build_data("fashion-mnist", 32, limit=100, seed=0)
    assert again.train.indices == b.train.indices and again.train.indices == sorted(again.train.indices)
    small = build_data("fashion-mnist", 32, limit=8)
    assert len(small.val) == 10  # at least one per class


@needs_fmnist
def test_an_epochs_images_keep_their_view_while_another_reader_draws_between_batches():
    """The step costs take a timing batch of view 0 in the middle of an epoch (a decision after an
    observation); the epoch's own batches stay those of its view (a run that never drops trains
    what `none` trains)."""
    from fxdrop.engine.feeds import Batching, ImageFeed

    b = build_data("fashion-mnist", 32, limit=200, seed=0)
    batching = Batching(device=torch.device("cpu"), batch_size=16, amp=False, channels_last=False, workers=0)
    feed = ImageFeed(
        {"train": b.train, "val": b.val},
        {"train": torch.arange(len(b.train)), "val": torch.arange(len(b.val))},
        batching,
    )
    order = torch.randperm(len(b.train), generator=torch.Generator().manual_seed(0))
    alone = [x for x, _ in feed.train_batches(order, 3)]
    interrupted = []
    for i, (x, _) in enumerate(feed.train_batches(order, 3)):
        interrupted.append(x)
        if i == 1:
            next(feed.images("train", torch.arange(16), 0, 16))
    assert len(alone) == len(interrupted) == 13
    assert all(torch.equal(a, c) for a, c in zip(alone, interrupted))


@needs_fmnist
def test_fingerprint(fmnist):
    fp = fmnist.train.fingerprint()
    assert len(fp) == 64 and fp == build_data("fashion-mnist", 32).train.fingerprint()
    fmnist.train.set_view(3)
    assert fmnist.train.fingerprint() == fp  # views are not part of it
    fmnist.train.set_view(0)
    assert fmnist.val.fingerprint() != fp
    assert build_data("fashion-mnist", 48).train.fingerprint() != fp
    assert build_data("fashion-mnist", 32, seed=1).train.fingerprint() != fp
    assert build_data("fashion-mnist", 32, seed=1).val.fingerprint() == fmnist.val.fingerprint()  # no aug
    assert build_data("fashion-mnist", 32, augment=False).train.fingerprint() != fp
    assert build_data("fashion-mnist", 32, limit=100).train.fingerprint() != fp


@needs_fmnist
def test_export_then_build_from_folder(tmp_path):
    out = tmp_path / "fm"
    counts = export_fashion_mnist(str(out), limit=50)
    assert counts["train"] == 50 and counts["val"] == 12  # max(50 // 4, 10)
    assert set(counts["per_class"]["train"].values()) == {5}
    b = build_data(str(out), 32)
    assert sorted(b.classes) == sorted(FASHION_MNIST_CLASSES)
    assert len(b.train) == 50 and len(b.val) == 12 and b.skipped == 0
    assert b.source == str(out.absolute())
    for split, ds in (("train", b.train), ("val", b.val)):
        per_class = {b.classes[c]: n for c, n in enumerate(torch.bincount(ds.labels, minlength=10).tolist())}
        assert per_class == counts["per_class"][split]
    # the same subset build_data('fashion-mnist', limit=50, seed=0) uses, pixel for pixel
    fm = build_data("fashion-mnist", 32, limit=50, seed=0)
    names = sorted(int(Path(p).stem) for p, _ in b.train.samples)
    assert names == fm.train.indices
    raw, labels = load_fashion_mnist("train")
    path, y = b.train.samples[0]
    j = int(Path(path).stem)
    assert np.array_equal(np.asarray(Image.open(path)), raw[j].numpy())
    assert b.classes[y] == FASHION_MNIST_CLASSES[labels[j]]
    x, _ = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    with pytest.raises(DataError, match="not empty"):
        export_fashion_mnist(str(out), limit=10)


def test_fxdrop_data_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDROP_DATA", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        build_data("fashion-mnist", 32)
    assert str(tmp_path) in str(err.value)


def test_corrupt_idx_file(tmp_path, monkeypatch):
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x03not an idx file")
    monkeypatch.setenv("FXDROP_DATA", str(tmp_path))
    with pytest.raises(DataError, match="not a valid IDX file") as err:
        load_fashion_mnist("test")
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# class_balanced_indices
# ---------------------------------------------------------------------------------------------


def test_class_balanced_indices():
    labels = [c for c in range(4) for _ in range(25)]  # 4 classes x 25
    idx = class_balanced_indices(labels, 40, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == 40
    assert torch.bincount(torch.tensor(labels)[idx]).tolist() == [10] * 4
    assert class_balanced_indices(labels, 40, seed=0) == idx
    assert class_balanced_indices(labels, 40, seed=1) != idx
    # a remainder goes to some classes, one extra each
    counts = torch.bincount(torch.tensor(labels)[class_balanced_indices(labels, 42, seed=0)], minlength=4)
    assert sorted(counts.tolist()) == [10, 10, 11, 11]
    # fewer requested than classes: at most one per class
    assert torch.bincount(torch.tensor(labels)[class_balanced_indices(labels, 3, seed=0)]).max() == 1
    assert class_balanced_indices(labels, 1000, seed=0) == list(range(100))
    assert class_balanced_indices(torch.tensor(labels), 40, seed=0) == idx  # tensors too


def test_class_balanced_indices_small_classes():
    labels = [0] * 3 + [1] * 50 + [2] * 50  # class 0 has fewer than its share
    counts = torch.bincount(torch.tensor(labels)[class_balanced_indices(labels, 30, seed=0)]).tolist()
    assert counts[0] == 3 and sorted(counts[1:]) == [13, 14]
    # a larger n extends a smaller one within each class
    assert set(class_balanced_indices(labels, 20, seed=0)) <= set(class_balanced_indices(labels, 60, seed=0))


# ---------------------------------------------------------------------------------------------
# ImageFolder directories
# ---------------------------------------------------------------------------------------------


def test_folder_dataset(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 2}})
    b = build_data(str(root), 24, seed=0)
    assert b.classes == ("cat", "dog") and len(b.train) == 7 and len(b.val) == 4 and b.skipped == 0
    for i in range(len(b.train)):  # RGB and grayscale files both give 3 channels
        x, y = b.train[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y in (0, 1)
    assert b.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    # deterministic per (seed, view, index), independent of the global RNGs, which it restores
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = b.train.get(1, 3)[0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    torch.manual_seed(99)
    random.seed(99)
    again = build_data(str(root), 24, seed=0).train
    assert torch.equal(again.get(1, 3)[0], a)
    assert not torch.equal(b.train.get(1, 4)[0], a)
    assert not torch.equal(build_data(str(root), 24, seed=1).train.get(1, 3)[0], a)
    assert torch.equal(b.val.get(0, 0)[0], b.val.get(0, 5)[0])  # val: deterministic transform
    # DataLoader workers agree with the main process
    b.train.set_view(2)
    ref = torch.stack([b.train[i][0] for i in range(len(b.train))])
    got = torch.cat([x for x, _ in DataLoader(b.train, batch_size=3, num_workers=2)])
    assert torch.equal(got, ref)


def test_folder_limit(tmp_path):
    root = make_folder(
        tmp_path / "d", {"train": {"a": 10, "b": 10, "c": 10}, "val": {"a": 4, "b": 4, "c": 4}}, size=(8, 8)
    )
    b = build_data(str(root), 8, limit=9)
    assert torch.bincount(b.train.labels).tolist() == [3, 3, 3]
    assert len(b.val) == 3  # max(9 // 4, 3 classes)


def test_folder_fingerprint_follows_files(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=(8, 8))
    fp = build_data(str(root), 16).train.fingerprint()
    assert build_data(str(root), 16).train.fingerprint() == fp
    assert build_data(str(root), 16, augment=False).train.fingerprint() != fp
    assert build_data(str(root), 20).train.fingerprint() != fp
    f = root / "train" / "a" / "000.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fp2 = build_data(str(root), 16).train.fingerprint()
    assert fp2 != fp
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "b" / "new.png")
    assert build_data(str(root), 16).train.fingerprint() not in (fp, fp2)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}}, size=(8, 8))
    (root / "train" / "a" / "garbage.png").write_bytes(b"this is not a png")
    good = (root / "train" / "b" / "000.png").read_bytes()
    (root / "train" / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "val" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    b = build_data(str(root), 8)
    assert b.skipped == 3
    assert len(b.train) == 6 and len(b.val) == 4
    assert not any("garbage" in p or "truncated" in p for p, _ in b.train.samples)
    for i in range(len(b.train)):
        b.train[i]
    # with a limit, an unreadable pick is replaced by a readable one of the same class
    lim = build_data(str(root), 8, limit=8)
    assert len(lim.train) == 6 and lim.skipped >= 1


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        build_data(str(missing), 32)
    assert str(missing) in str(err.value)

    only_train = make_folder(tmp_path / "t", {"train": {"a": 1}}, size=(8, 8))
    with pytest.raises(DataError, match="missing") as err:
        build_data(str(only_train), 32)
    assert str(only_train / "val") in str(err.value)

    mismatch = make_folder(
        tmp_path / "m", {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "b": 1, "d": 1}}, size=(8, 8)
    )
    with pytest.raises(DataError, match="different classes") as err:
        build_data(str(mismatch), 32)
    msg = str(err.value)
    assert str(mismatch) in msg and "'c'" in msg and "'d'" in msg

    empty_class = make_folder(tmp_path / "e", {"train": {"a": 1}, "val": {"a": 1}}, size=(8, 8))
    (empty_class / "train" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) b hold no images") as err:
        build_data(str(empty_class), 32)
    assert str(empty_class / "train") in str(err.value)

    no_classes = tmp_path / "n"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    with pytest.raises(DataError, match="no class folders") as err:
        build_data(str(no_classes), 32)
    assert str(no_classes / "train") in str(err.value)

    all_bad = tmp_path / "b"
    for split in ("train", "val"):
        (all_bad / split / "a").mkdir(parents=True)
        (all_bad / split / "a" / "x.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="no readable images") as err:
        build_data(str(all_bad), 32)
    assert str(all_bad) in str(err.value)

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        build_data(str(a_file), 32)


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="image size"):
        build_data("fashion-mnist", 0)
    with pytest.raises(DataError, match="limit"):
        build_data("fashion-mnist", 32, limit=0)


def test_numpy_rng_is_seeded_only_for_auto_augment():
    from timm.data import create_transform

    from fxdrop.data.keys import _uses_numpy_rng

    assert not _uses_numpy_rng(create_transform(32, is_training=True))
    assert _uses_numpy_rng(create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5"))
    assert _uses_numpy_rng(create_transform(32, is_training=True, auto_augment="augmix-m5-w4-d2"))


_DIGEST_SCRIPT = """
import hashlib, sys
from fxdrop.data import build_data
h = hashlib.sha256()
for data in sys.argv[1:]:
    ds = build_data(data, 24, seed=5, limit=20).train
    for i in range(len(ds)):
        h.update(ds.get(i, 3)[0].numpy().tobytes())
print(h.hexdigest())
"""


def test_views_are_identical_in_a_fresh_process(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 1, "b": 1}}, size=(20, 20))
    sources = [str(root)] + (["fashion-mnist"] if HAVE_FMNIST else [])
    h = hashlib.sha256()
    for data in sources:
        ds = build_data(data, 24, seed=5, limit=20).train
        for i in range(len(ds)):
            h.update(ds.get(i, 3)[0].numpy().tobytes())
    env = dict(os.environ, PYTHONHASHSEED="12345")  # another str-hash seed, another interpreter
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT, *sources], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == h.hexdigest()


def test_16_bit_png_keeps_its_picture(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=(16, 16))
    ramp = (np.arange(16, dtype=np.uint16)[None, :] * 4369).repeat(16, axis=0)  # 0 .. 65535 left to right
    Image.fromarray(ramp).save(root / "train" / "a" / "wide.png")  # mode I;16
    # the same picture in 8 bits: 4369 = 17 * 257, so every 16-bit value has an exact 8-bit twin
    Image.fromarray((ramp // 257).astype(np.uint8)).save(root / "train" / "b" / "narrow.png")  # mode L
    with Image.open(root / "train" / "a" / "wide.png") as im:
        assert im.mode.startswith("I")
    b = build_data(str(root), 16, augment=False)
    x = {  # (3, 16, 16) each
        Path(path).stem: b.train[k][0]
        for k, (path, _) in enumerate(b.train.samples)
        if Path(path).stem in ("wide", "narrow")
    }
    columns = x["wide"][0].mean(0)  # brightness left to right
    assert x["wide"].std() > 0.5, "a 16-bit image became flat (white)"
    assert torch.all(columns[1:] >= columns[:-1]) and columns[-1] > columns[0]  # the ramp survives
    assert torch.equal(x["wide"], x["narrow"])


def test_truncated_jpeg_is_skipped_counted_and_never_stops_the_run(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}}, size=(32, 32))
    photo = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "train" / "a" / "photo.jpg", quality=90)
    data = (root / "train" / "a" / "photo.jpg").read_bytes()
    (root / "train" / "a" / "photo.jpg").write_bytes(data[: len(data) // 2])
    b = build_data(str(root), 16)
    assert b.skipped == 1 and len(b.train) == 6
    for ds in (b.train, b.val):
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 16, 16)
