"""What a new user hits: resume under the default policy, foreign weights, too-small images, bars
before errors, FLOPs counted per step, freeze-only said so, epochs numbered as on screen, updates
from an exported folder, image-size defaults, checkpoint size, and the small things."""

from __future__ import annotations

import json
import re
import socket
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY_CNN, DropAfterObservations, needs_fmnist, run_cli
from helpers import one_line as _error_line
from safetensors.torch import save_file
from torch import nn

import fxdrop
from fxdrop.data import FASHION_MNIST_CLASSES, build_data, export_fashion_mnist
from fxdrop.finetuning import finetune, load_weights
from fxdrop.records import Drop


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(TINY_CNN)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fm") / "fm"
    export_fashion_mnist(str(out), limit=80)
    return out


def _tiny(model_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        f"{model_file}:build",
        "-d",
        "fashion-mnist",
        "--limit",
        "128",
        "--img-size",
        "16",
        "-e",
        "2",
        "-b",
        "32",
        "-o",
        str(out),
        *extra,
    ]


# ---- 2. weights of another architecture ---------------------------------------------------------


def test_weights_of_a_deeper_model_say_what_was_not_used():
    small = timm.create_model("resnet18", num_classes=10)
    deeper = timm.create_model("resnet34", num_classes=10).state_dict()
    loaded = load_weights(small, _saved(deeper))
    extra = set(deeper) - set(small.state_dict())  # layer1.2, layer2.2, ...: resnet34's extra blocks
    assert set(loaded.unused) == extra and loaded.loaded == len(small.state_dict())
    line = loaded.describe()
    assert f"{len(extra)} of the file not used" in line and loaded.unused[0] in line


def test_weights_that_mostly_do_not_fit_are_refused():
    resnet = timm.create_model("resnet18", num_classes=10)
    vgg = timm.create_model("vgg11", num_classes=10).state_dict()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(fxdrop.ModelSourceError, match="do not fit this model.*another architecture"):
        load_weights(resnet, _saved(vgg))
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())  # nothing was loaded


def _saved(state: dict[str, torch.Tensor]) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@needs_fmnist
def test_the_cli_names_unused_weights(model_file, tmp_path):
    sys.path.insert(0, str(model_file.parent))
    try:
        state = __import__("net").build(10).state_dict()
    finally:
        sys.path.pop(0)
    state |= {"head2.weight": torch.zeros(3, 3), "head2.bias": torch.zeros(3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    proc = run_cli(
        *_tiny(model_file, tmp_path / "run", "--weights", str(tmp_path / "w.safetensors"), "-p", "none")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 of the file not used (e.g. head2." in proc.stdout


# ---- 3. too-small images, 4. no bars before an error ----------------------------------------------


def test_too_small_images_are_one_line_naming_the_smallest_size(tmp_path):
    _error_line(run_cli("inspect", "torchvision:vgg11", "--img-size", "7"), "--img-size 7", "32 px")
    _error_line(
        run_cli(
            "finetune",
            "torchvision:vgg11",
            "-d",
            "fashion-mnist",
            "--img-size",
            "7",
            "--no-pretrained",
            "-o",
            str(tmp_path / "o"),
        ),
        "--img-size 7",
        "32 px",
    )
    _error_line(run_cli("inspect", "timm:resnet18", "--img-size", "0"), "--img-size", "positive")
    assert not (tmp_path / "o").exists()


def test_a_size_below_the_downsampling_warns():
    proc = run_cli("inspect", "timm:resnet18", "--img-size", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "32 px" in proc.stderr and "downsampling (32x)" in proc.stderr
    assert json.loads(proc.stdout)  # the cut points are still listed


@needs_fmnist
def test_a_bad_option_draws_no_progress_bar(model_file, tmp_path):
    args = _tiny(model_file, tmp_path / "run")
    args[args.index("-e") + 1] = "-3"
    proc = run_cli(*args)
    _error_line(proc, "--epochs")
    assert "epochs" not in proc.stdout and "━" not in proc.stdout, proc.stdout


# ---- 5. FLOPs per step, 6. freeze-only said so, 7. epochs from 1 ------------------------------------


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    return nn.Sequential(
        *block(3, 8),
        nn.MaxPool2d(2),
        *block(8, 16),
        nn.MaxPool2d(2),
        *block(16, 16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def fmnist():
    return build_data("fashion-mnist", 16, limit=256, seed=0)


@needs_fmnist
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "freeze-only"])
def test_forward_flops_are_counted_per_step(fmnist, tmp_path, cache):
    steps = []  # the cut of every step, from the events the screen shows
    state = {"cut": -1}

    def seen(kind, info):
        if kind == "drop":
            state["cut"] = info["cut"]
        elif kind == "step":
            steps.append(state["cut"])

    res = fxdrop.fit(
        _small_cnn(),
        fmnist.train,
        fmnist.val,
        policy=DropAfterObservations(4, 6),
        epochs=3,
        batch_size=32,
        seed=0,
        cache=cache,
        out_dir=tmp_path / "run",
        on_event=seen,
    )
    (drop,) = res.events
    assert drop["epoch"] == 2 and 0 < steps.index(4) % 8  # in the middle of the 2nd epoch (8 steps each)
    suffix = res.graph.cut_points[4].suffix_flops / res.graph.total_flops
    forward = [1.0 if c < 0 or not cache else suffix for c in steps]  # freeze-only still runs the prefix
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert res.forward_flops_fraction == pytest.approx(sum(forward) / len(forward))
    assert metrics["forward_flops_fraction"] == pytest.approx(sum(forward) / len(forward))
    epochs = [e["train_flops_fraction"] for e in metrics["epochs"]]
    assert epochs[0] == 1.0  # nothing dropped yet: the whole model, forward and backward
    if cache:  # the prefix never runs: forward and backward both see the suffix's share
        assert epochs[2] == pytest.approx(suffix)
    else:  # the prefix runs forward only: less than the whole model, more than the cached run
        assert suffix < epochs[2] < 1.0
    # the run's fraction is the mean over its steps: 8 in each epoch
    assert metrics["train_flops_fraction"] == pytest.approx(sum(epochs) / 3)
    second = metrics["epochs"][1]  # the epoch of the drop: its mean over its own steps
    assert second["forward_flops_fraction"] == pytest.approx(sum(forward[8:16]) / 8)
    assert [h["epoch"] for h in metrics["epochs"]] == [1, 2, 3]
    assert drop["cached"] is cache


def test_a_freeze_only_drop_says_so_and_fits_on_one_line():
    from fxdrop_cli import main as cli

    event = Drop(
        3,
        20,
        7,
        node="layer1",
        module="layer1",
        why={"predicted_step_s": 0.12, "predicted_step_s_before": 0.146},
        frozen_params=157504,
        cached=False,
    )
    with cli.console.capture() as captured:
        with cli._Progress(3) as shown:
            shown("drop", event)
            shown("drop", replace(event, cached=True, cache_bytes=3 * 2**20, cache_seconds=1.25))
    lines = captured.get().splitlines()
    assert "freeze-only (prefix recomputed)" in lines[0] and "cache" not in lines[0]
    assert "cache 3.0 MiB built in 1.2 s" in lines[2] and "freeze-only" not in lines[2]
    assert all(len(ln) <= 100 for ln in lines) and "(predicted)" not in captured.get()


@needs_fmnist
def test_fixed_at_n_drops_after_n_epochs_and_events_count_from_one(fmnist, tmp_path):
    res = fxdrop.fit(
        _small_cnn(),
        fmnist.train,
        fmnist.val,
        policy=fxdrop.Fixed(4, 1),
        epochs=2,
        batch_size=32,
        out_dir=tmp_path / "run",
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [(h["epoch"], h["cut"]) for h in metrics["epochs"]] == [(1, -1), (2, 4)]
    assert [e["epoch"] for e in metrics["events"]] == [2] and res.events[0][
        "step"
    ] == 8  # after 1 epoch of 8 steps


# ---- 8. update from an exported folder, 9. image-size defaults --------------------------------------


@needs_fmnist
def test_an_exported_folder_has_the_built_in_classes_in_the_built_in_order(exported):
    bundle = build_data(str(exported), 16, classes=FASHION_MNIST_CLASSES)
    assert bundle.classes == FASHION_MNIST_CLASSES
    by_label = {
        y: Path(bundle.train.samples[i][0]).parent.name for i, (_, y) in enumerate(bundle.train.samples)
    }
    assert by_label == dict(enumerate(FASHION_MNIST_CLASSES))  # labels follow the names, not the folder order
    with pytest.raises(fxdrop.DataError, match="same class folders"):
        build_data(str(exported), 16, classes=FASHION_MNIST_CLASSES[:-1] + ("Boots",))


@needs_fmnist
def test_a_fashion_mnist_run_updates_from_its_exported_folder(model_file, exported, tmp_path):
    out = tmp_path / "run"
    finetune(
        f"{model_file}:build",
        "fashion-mnist",
        out,
        policy=fxdrop.Fixed(4, 0),
        img_size=16,
        limit=64,
        epochs=1,
        batch_size=32,
    )
    result = fxdrop.update_folder(out, str(exported), epochs=1, batch_size=32)
    assert result.update["update"] == 1 and result.update["new_samples"] > 0
    assert json.loads((out / "metrics.json").read_text())["updates"][0]["update"] == 1


@needs_fmnist
def test_a_folder_of_small_images_trains_at_their_size(model_file, exported, tmp_path):
    said = []
    res = finetune(
        f"{model_file}:build",
        str(exported),
        tmp_path / "tiny",
        policy=fxdrop.NoDrop(),
        epochs=1,
        batch_size=32,
        on_event=lambda kind, info: said.append(info) if kind == "img_size" else None,
    )
    assert said[0]["img_size"] == 28 and "own size" in said[0]["why"]  # the images', not the default 224
    assert res.graph.example_input.shape[-1] == 28
    said.clear()
    finetune(
        "timm:resnet18",
        str(exported),
        tmp_path / "r18",
        policy=fxdrop.NoDrop(),
        epochs=1,
        batch_size=32,
        on_event=lambda kind, info: said.append(info) if kind == "img_size" else None,
    )
    assert said[0]["img_size"] == 32 and "28 px" in said[0]["why"]  # not below ResNet's downsampling


def test_pretrained_weights_offline_fail_at_once(monkeypatch, capfd):
    from fxdrop import models

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hub-cache")
    with pytest.raises(fxdrop.ModelSourceError, match="offline.*`weights`"):
        models.create_model("timm:resnet18", pretrained=True)
    assert "Retrying" not in capfd.readouterr().err  # no round of hub retries first


# ---- 10. checkpoint size ------------------------------------------------------------------------------


@needs_fmnist
def test_the_checkpoint_keeps_no_second_copy_of_the_weights(fmnist, tmp_path):
    model = _small_cnn()
    fxdrop.fit(
        model,
        fmnist.train,
        fmnist.val,
        policy=fxdrop.LearnDrop(),
        epochs=2,
        batch_size=32,
        out_dir=tmp_path / "run",
    )
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    policy = ck["policy"]
    held = [t for t in policy["snapshot"].values() if t is not None]
    held += list(policy["past"].values())
    weights = sum(p.numel() * 4 for p in model.parameters() if p.dim() >= 2)
    # the snapshot is the checkpoint's own model (the last observation was at the epoch's end)
    assert policy["snapshot"] and all(t is None for t in policy["snapshot"].values())
    assert sum(t.numel() * t.element_size() for t in held) <= weights / 2  # one bf16 move per segment
    assert ck["model"] is not None and "checkpoint_bytes" in json.loads(
        (tmp_path / "run" / "metrics.json").read_text()
    )


# ---- 11. small things, 12. repeated splits -------------------------------------------------------


@needs_fmnist
def test_small_things_on_screen(model_file, tmp_path):
    proc = run_cli("data", "export", "fashion-mnist", str(tmp_path / "fm"), "--limit", "20")
    assert proc.returncode == 0 and "{" not in proc.stdout and "20 training" in proc.stdout, proc.stdout
    (tmp_path / "bare").mkdir()
    _error_line(
        run_cli("finetune", f"{model_file}:build", "-d", str(tmp_path / "bare"), "-o", str(tmp_path / "o")),
        "fxdrop data export",
    )
    assert "bare timm name" in run_cli("finetune", "--help").stdout
    run = _tiny(model_file, tmp_path / "run", "-p", "fixed:4@1")
    first = run_cli(*run)
    assert first.returncode == 0 and "MiB" in first.stdout and " MB" not in first.stdout, first.stdout
    run[run.index("-e") + 1] = "3"
    resumed = run_cli(*run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "3/3" in next(ln for ln in resumed.stdout.splitlines() if ln.strip().startswith("epochs"))
    report = run_cli("report", str(tmp_path / "run"))
    assert report.returncode == 0 and "events" in report.stdout, report.stderr


@needs_fmnist
def test_timm_style_training_flags_reach_the_config(model_file, tmp_path):
    proc = run_cli(
        *_tiny(
            model_file,
            tmp_path / "run",
            "-p",
            "none",
            "--weight-decay",
            "0.01",
            "--momentum",
            "0.8",
            "--warmup-epochs",
            "0",
            "--smoothing",
            "0.1",
            "--no-amp",
            "-j",
            "0",
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (
        cfg["weight_decay"],
        cfg["momentum"],
        cfg["warmup_epochs"],
        cfg["label_smoothing"],
        cfg["amp"],
        cfg["epochs"],
        cfg["batch_size"],
    ) == (0.01, 0.8, 0.0, 0.1, False, 2, 32)


def test_a_split_before_an_earlier_one_warns_that_it_trains_again_what_that_froze():
    model = _small_cnn()
    dg = fxdrop.trace(model, torch.randn(2, 3, 16, 16))
    dg.split(6)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.warns(UserWarning, match="trains again .* earlier split froze.*latest split decides"):
        dg.split(2)
    assert frozen - {n for n, p in model.named_parameters() if not p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dg.split(8)  # a later split thaws nothing: no warning


# ---- issue 27: the README's API example, and a model handed over frozen -------------------------


@needs_fmnist
def test_the_readme_api_example_runs_as_written_and_trains_the_whole_model(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- api: run by [^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert block, "README lost its Python API example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing of the model is left frozen
        exec(compile(block.group(1), "README api", "exec"), scope)  # noqa: S102 (the documented example)
    metrics = json.loads((tmp_path / "runs" / "r18" / "metrics.json").read_text())
    assert metrics["frozen_at_start"] == [] and scope["result"].final_val_acc > 0


def test_fit_says_which_modules_it_was_handed_frozen_and_leaves_them_so(fmnist, tmp_path):
    model = _small_cnn()
    dg = fxdrop.trace(model, torch.randn(2, 3, 16, 16))
    dg.split(2)  # freezes the first block (conv 0, bn 1) on the model itself
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"0.weight", "1.weight", "1.bias"}
    with pytest.warns(UserWarning, match=r"parameters of 0, 1 have requires_grad=False .*dg.unsplit\(\)"):
        fxdrop.fit(model, fmnist.train, fmnist.val, policy=fxdrop.NoDrop(), epochs=1, out_dir=tmp_path / "r")
    for n, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[n], before)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["frozen_at_start"] == ["0", "1"]
    dg.unsplit()
    assert all(p.requires_grad for p in model.parameters())
