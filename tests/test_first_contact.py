"""What a user meets first and must be able to trust (issue 27): a damaged cache is named, image
sizes follow the model's real downsampling, the README's API example runs as written and trains
what it says, lock files and memos do not pile up, an interrupt says what it kept, and validation
at chance while the loss falls is explained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import TINY_CNN, needs_fmnist, run_cli
from PIL import Image

from fxdrop._io import FolderLock
from fxdrop.cache import ActivationCache
from fxdrop.finetuning import _choose_img_size
from fxdrop.img_size import check_img_size


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(TINY_CNN)
    return path


def _tiny_run(model_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        f"{model_file}:build",
        "-d",
        "fashion-mnist",
        "--limit",
        "128",
        "--img-size",
        "16",
        "-b",
        "32",
        "-o",
        str(out),
        *extra,
    ]


# ---- 1. a damaged cache is named ----------------------------------------------------------------


def _written(root: Path) -> ActivationCache:
    x = torch.randn(24, 4, 3, 3)  # (N, C, H, W)
    blocks = [(x[i : i + 8], torch.arange(i, i + 8) % 3, torch.arange(i, i + 8), 0) for i in (0, 8, 16)]
    cache, _ = ActivationCache.write(root, "fp", iter(blocks), "fp32", keep=False, shard_bytes=2**20)
    return cache


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # same size, other bytes
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[:-8]))
    else:
        path.unlink()


@pytest.mark.parametrize("how, check", [("flip", "sha256"), ("truncate", "size"), ("delete", "missing")])
def test_a_damaged_shard_is_named_with_the_check_it_failed(tmp_path, how, check):
    shard = _written(tmp_path / "c").manifest["shards"][0]["file"]
    _damage(tmp_path / "c" / shard, how)
    found, why = ActivationCache.find(tmp_path / "c", "fp")
    assert found is None and (why.check, why.file) == (check, shard)


def test_a_cache_whose_manifest_is_damaged_or_missing_says_so_and_nothing_there_says_nothing(tmp_path):
    assert ActivationCache.find(tmp_path / "c", "fp") == (None, None)
    _written(tmp_path / "c")
    assert ActivationCache.find(tmp_path / "c", "other")[1].check == "fingerprint"
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    assert ActivationCache.find(tmp_path / "c", "fp")[1].check == "manifest"
    (tmp_path / "c" / "manifest.json").unlink()
    why = ActivationCache.find(tmp_path / "c", "fp")[1]
    assert why.check == "manifest" and "missing" in why.detail


@needs_fmnist
def test_a_flipped_shard_of_a_kept_cache_is_named_on_screen_and_in_metrics(model_file, tmp_path):
    out = tmp_path / "run"
    first = run_cli(*_tiny_run(model_file, out, "-p", "fixed:4@0", "-e", "1"))
    assert first.returncode == 0, first.stderr
    (folder,) = (out / "cache").glob("cut-*/train-rank0of1")
    shard = json.loads((folder / "manifest.json").read_text())["shards"][0]["file"]
    _damage(folder / shard, "flip")
    resumed = run_cli(*_tiny_run(model_file, out, "-p", "fixed:4@0", "-e", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stdout.splitlines() if shard in line]
    assert len(said) == 1 and "sha256" in said[0] and "rebuilt" in said[0], resumed.stdout
    (rebuilt,) = json.loads((out / "metrics.json").read_text())["cache_rebuilds"]
    assert (rebuilt["file"], rebuilt["check"]) == (shard, "sha256")
    assert rebuilt["folder"] == str(folder) and rebuilt["samples"] > 0
    assert ActivationCache.open(folder, json.loads((folder / "manifest.json").read_text())["fingerprint"])


# ---- 2. image sizes follow the feature extractor's downsampling ----------------------------------


@pytest.fixture(scope="module")
def folder_64(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img64")
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (64, 64), (40 * i, 90, 0)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "spec, build",
    [
        ("timm:efficientnet_b0", lambda: timm.create_model("efficientnet_b0", pretrained=False)),
        ("timm:convnext_atto", lambda: timm.create_model("convnext_atto", pretrained=False)),
        ("torchvision:mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small()),
        ("timm:resnet50", lambda: timm.create_model("resnet50", pretrained=False)),
    ],
)
def test_squeeze_excite_and_head_norms_are_not_downsampling(spec, build, folder_64):
    model = build()
    # the feature maps these models hand their heads are 1/32 of the input (timm's reductions,
    # torchvision's documented stride), as for a ResNet
    checked = check_img_size(model, 64, spec)
    assert checked.stride == 32 and checked.warning is None
    assert _choose_img_size(model, spec, str(folder_64), None)[0] == 64


# ---- 4. lock files and the file-facts memos -------------------------------------------------------


def test_a_released_lock_leaves_no_file_and_the_folder_can_be_locked_again(tmp_path):
    lock = FolderLock(tmp_path, "run folder")
    with pytest.raises(Exception, match="in use by process"):
        FolderLock(tmp_path, "run folder")
    lock.release()
    assert not (tmp_path / FolderLock.NAME).exists()
    FolderLock(tmp_path, "run folder").release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_taken_on_the_file_its_holder_deleted_is_not_held(tmp_path, monkeypatch):
    import fxdrop._io as io

    first = FolderLock(tmp_path, "run folder")
    real, calls = io.fcntl.flock, []

    def flock_after_release(fd, op):
        # the race: the second process has opened the lock file; the holder now releases (and
        # deletes it) before the second process locks what it opened
        calls.append(fd)
        if len(calls) == 1:
            first.release()
        return real(fd, op)

    monkeypatch.setattr(io.fcntl, "flock", flock_after_release)
    second = FolderLock(tmp_path, "run folder")
    monkeypatch.setattr(io.fcntl, "flock", real)
    assert len(calls) == 2  # it found its file deleted and locked the new one
    with pytest.raises(Exception, match="in use by process"):
        FolderLock(tmp_path, "run folder")
    second.release()
    assert not (tmp_path / FolderLock.NAME).exists()


@needs_fmnist
def test_a_finished_run_leaves_no_lock_file(model_file, tmp_path):
    proc = run_cli(*_tiny_run(model_file, tmp_path / "run", "-p", "fixed:4@0", "-e", "1"))
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "run").rglob(FolderLock.NAME))


def test_the_file_facts_memos_are_bounded_least_recently_used_first_and_can_be_cleared(tmp_path, monkeypatch):
    import fxdrop.data.file_facts as facts

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folders = []
    for k in range(4):
        root = tmp_path / f"d{k}"
        root.mkdir()
        (root / "a.png").write_bytes(os.urandom(64))
        folders.append(root)

    def remember(root: Path) -> Path:
        memo = facts.FileFacts(root)
        memo.sha256(str(root / "a.png"))
        memo.save()
        return memo.path

    paths = [remember(r) for r in folders[:3]]
    size = paths[0].stat().st_size
    for i, p in enumerate(paths):
        os.utime(p, (1000 + i, 1000 + i))  # d0 least recently used
    assert facts.FileFacts(folders[0]).facts  # reading d0's memo uses it: now d1 is the oldest
    monkeypatch.setattr(facts, "MAX_BYTES", 3 * size + size // 2)
    fourth = remember(folders[3])
    left = set(facts.facts_dir().glob("*.json"))
    assert left == {paths[0], paths[2], fourth}
    total = sum(p.stat().st_size for p in left)
    assert facts.clear_file_facts().__dict__ == {"folder": facts.facts_dir(), "files": 3, "bytes": total}
    assert not list(facts.facts_dir().glob("*"))


def test_clean_cache_clears_the_memos_from_the_command_line(tmp_path, monkeypatch):
    # reason: a cache folder of its own (other tests leave memos in the session's)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    memo_dir = tmp_path / "xdg" / "fxdrop" / "file-facts"
    memo_dir.mkdir(parents=True, exist_ok=True)
    (memo_dir / "x.json").write_text("{}")
    proc = run_cli("clean-cache")
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 file-facts memo" in proc.stdout and not (memo_dir / "x.json").exists()


# ---- 5. an interrupt says what it kept; a resume with nothing to resume says so -------------------


def _interrupted_after(*events) -> str:
    from fxdrop_cli.main import _Progress, _Terminated

    progress = _Progress(3)
    with pytest.raises(_Terminated) as caught, progress:
        for record in events:
            progress(record.kind, record)
        raise _Terminated(2)
    return caught.value.line


def test_an_interrupt_says_which_epoch_is_kept_or_that_none_is():
    from fxdrop.records import Checkpoint, EpochStart

    def start(epoch):
        return EpochStart(epoch=epoch, epochs=3, steps=4, cut=-1)

    assert "no epoch is kept" in _interrupted_after(start(1))
    kept = _interrupted_after(start(1), Checkpoint(epoch=1, bytes=1), start(2))
    assert "epoch 1 of 3 is kept" in kept and "--resume" in kept
    assert "epoch 2 of 3 is kept" in _interrupted_after(start(3))  # a resumed run
    assert _interrupted_after() == "interrupted before training began"


@needs_fmnist
def test_resume_with_no_finished_epoch_says_it_starts_from_scratch(tmp_path):

    from fxdrop.data import build_data

    data = build_data("fashion-mnist", 16, limit=64, seed=0)
    events = []
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    )
    import fxdrop

    fxdrop.fit(
        model,
        data.train,
        data.val,
        policy=fxdrop.NoDrop(),
        epochs=1,
        out_dir=tmp_path / "r",
        resume=True,
        on_event=lambda kind, info: events.append((kind, info)),
    )
    said = [info["reason"] for kind, info in events if kind == "no_resume"]
    assert len(said) == 1 and "no finished epoch to resume" in said[0] and "from scratch" in said[0]


# ---- 6. validation at chance while the loss falls -------------------------------------------------


def test_validation_at_chance_while_the_loss_falls_names_a_low_batchnorm_momentum():
    from fxdrop.engine.chance import at_chance
    from fxdrop.records import Epoch

    slow = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01))
    first = [Epoch(1, train_loss=2.3, val_acc=0.1)]
    note = at_chance(slow, Epoch(2, train_loss=1.6, val_acc=0.1), first, (10,), 1000)
    assert note["bn_momentum"] == 0.01 and "BatchNorm momentum is 0.01" in note["why"]
    assert at_chance(slow, Epoch(2, train_loss=1.6, val_acc=0.45), first, (10,), 1000) is None
    assert at_chance(slow, Epoch(2, train_loss=2.29, val_acc=0.1), first, (10,), 1000) is None
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    note = at_chance(plain, Epoch(2, train_loss=1.6, val_acc=0.1), first, (10,), 1000)
    assert "BatchNorm momentum" not in note["why"] and "evaluates differently" in note["why"]


@needs_fmnist
def test_a_model_whose_running_statistics_never_move_is_said_once_and_recorded(tmp_path):
    import fxdrop
    from fxdrop.data import build_data

    data = build_data("fashion-mnist", 16, limit=320, seed=0)
    torch.manual_seed(0)
    head_norm = torch.nn.BatchNorm1d(10, momentum=0.0)  # running statistics stay at their start
    head_norm.running_var.fill_(1e12)  # in eval mode every score is its bias: one class, chance
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
        head_norm,
    )
    events = []
    fxdrop.fit(
        model,
        data.train,
        data.val,
        policy=fxdrop.NoDrop(),
        epochs=3,
        lr=0.2,
        batch_size=32,
        out_dir=tmp_path / "r",
        on_event=lambda kind, info: events.append((kind, info)),
    )
    said = [info for kind, info in events if kind == "val_at_chance"]
    assert len(said) == 1 and "BatchNorm momentum is 0" in said[0]["why"]
    assert (
        json.loads((tmp_path / "r" / "metrics.json").read_text())["val_at_chance"]["epoch"]
        == said[0]["epoch"]
    )
