"""The `fxdrop` command: output, and one clear line with a non-zero exit for bad input."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import pydoc
import re
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import pytest
import typer
from helpers import TINY_CNN, needs_fmnist, run_cli
from rich.console import Console
from typer.testing import CliRunner

import fxdrop as lib
from fxdrop.cost import StepCosts
from fxdrop.inspection import ModelReport, inspect_model
from fxdrop_cli import main as cli
from fxdrop_cli import render


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_inspect_json_lists_cut_points():
    proc = run_cli("inspect", "timm:resnet18", "--img-size", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["img_size"] == 32 and out["step_ms"] is None  # no --cost, nothing timed
    rows = out["rows"]
    assert len(rows) > 5
    assert {
        "name",
        "module",
        "shape",
        "bytes_per_sample",
        "prefix_flops",
        "suffix_flops",
        "prefix_params",
        "suffix_params",
    } <= rows[0].keys()


def test_inspect_table_shows_blocks():
    proc = run_cli("inspect", "torchvision:resnet18", "--img-size", "32")
    assert proc.returncode == 0, proc.stderr
    # layer2.1's last ReLU, the module layer2's end: its add is the same cut (same frozen parameters)
    assert "layer2 (layer2_1_relu_1)" in proc.stdout and "= add_3" in proc.stdout and "KiB" in proc.stdout


def test_inspect_user_file_factory(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))\n"
    )
    proc = run_cli("inspect", f"{tmp_path / 'net.py'}:build", "--img-size", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    # the ReLU and the Flatten after the conv freeze nothing more, and their activation is as
    # large: one row, the latest of the three, the others its alternatives
    assert [(r["module"], [a["module"] for a in r["alternatives"]]) for r in rows] == [("2", ["0", "1"])]


def test_unknown_model_names_close_matches():
    _one_error_line(run_cli("inspect", "timm:resnet153"), "resnet153", "resnet152")


def test_missing_data_dir(tmp_path):
    _one_error_line(
        run_cli(
            "finetune",
            "timm:resnet18",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--no-pretrained",
        ),
        "nope",
    )


def test_unknown_policy_and_cut(tmp_path):
    _one_error_line(
        run_cli(
            "finetune",
            "timm:resnet18",
            "--data",
            "fashion-mnist",
            "--out",
            str(tmp_path / "o"),
            "--no-pretrained",
            "--policy",
            "sometimes",
        ),
        "unknown policy",
    )


@needs_fmnist
def test_finetune_on_exported_folder_then_refuses_to_clobber(tmp_path):
    assert run_cli("data", "export", "fashion-mnist", str(tmp_path / "fm"), "--limit", "60").returncode == 0
    args = [
        "finetune",
        "timm:resnet18",
        "--data",
        str(tmp_path / "fm"),
        "--img-size",
        "32",
        "--out",
        str(tmp_path / "run"),
        "--no-pretrained",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--policy",
        "fixed:layer1@1",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "drop" in proc.stdout and "summary" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["events"][0]["module"] == "layer1"
    _one_error_line(run_cli(*args), "already holds a run", "--resume")
    _one_error_line(run_cli(*args[:-2], "--policy", "fixed:layer9@1", "--overwrite"), "layer9")
    # the bad cut was found before --overwrite deleted anything
    assert (tmp_path / "run" / "model.safetensors").exists()


# ---- issue 27: what a new user met -----------------------------------------------------------------

_COMMANDS = ("", "inspect", "finetune", "update", "report", "clean-cache", "data export")
_PANELS = ("Data", "Model", "Training", "Mixing (timm's flags)", "Dropping", "Cache", "Output")


def _tiny_model(tmp_path: Path) -> str:
    (tmp_path / "tiny.py").write_text(TINY_CNN)
    return f"{tmp_path / 'tiny.py'}:build"


def test_version_is_the_installed_distributions():
    shown = CliRunner().invoke(cli.app, ["--version"])
    assert shown.exit_code == 0, shown.output
    assert shown.output.strip() == f"fxdrop {importlib.metadata.version('fxdrop')}"


def _help(command: str) -> str:
    """`fxdrop COMMAND --help` in this process, its wrapped lines joined (no frame, one space)."""
    shown = CliRunner().invoke(cli.app, [*command.split(), "--help"], env={"COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    return shown.output


@pytest.mark.parametrize("command", _COMMANDS)
def test_help_shows_no_value_after_a_switch(command):
    assert "<bool>" not in _help(command)


def test_finetune_help_groups_its_options_and_states_the_defaults_it_resolves():
    finetune = typer.main.get_command(cli.app).commands["finetune"]
    options = [p for p in finetune.params if p.param_type_name == "option"]
    assert {p.rich_help_panel for p in options} == set(_PANELS)
    shown = _help("finetune")
    titles = re.findall(r"╭─ (.+?) ─", shown)
    assert [t for t in titles if t in _PANELS] == list(_PANELS)  # in the order a run needs them
    text = " ".join(shown.replace("│", " ").split())
    # the default rules the library applies, checked against it
    sgd, adamw = re.search(r"so ([0-9.]+) at batch 64; ([0-9.e-]+) with adamw", text).groups()
    assert float(sgd) == lib.FitConfig(batch_size=64).resolved_lr()
    assert float(adamw) == lib.FitConfig(optimizer="adamw").resolved_lr()
    for default in ("auto: on with CUDA", "auto: cuda if available", "auto: 32 for fashion-mnist"):
        assert default in text, default


def test_fit_config_documents_every_field_where_help_shows_it():
    shown = pydoc.render_doc(lib.FitConfig, renderer=pydoc.plaintext)
    section = shown[shown.index("Attributes:") :]
    documented = set(re.findall(r"^ \|\s{6}(\w+): ", section, re.M))
    assert documented == {f.name for f in fields(lib.FitConfig)}


@pytest.mark.parametrize("command", ["finetune", "update", "data export"])
def test_limit_says_it_shrinks_validation_too(command):
    text = " ".join(_help(command).replace("│", " ").split())
    assert "N training images and max(N/4, classes) validation images" in text, text


@needs_fmnist
def test_the_data_line_says_limit_subsets_both_splits():
    bundle = lib.data.build_data("fashion-mnist", 32, limit=1000)
    with cli.console.capture() as shown:
        cli._Progress(1, limit=1000)("data", bundle.summary())
    # 1000 // 4 validation images: fashion-mnist has 10 classes
    assert "1000 training and 250 validation images (--limit 1000: class-balanced subsets of both)" in (
        shown.get()
    )


@needs_fmnist
def test_an_update_of_a_fixed_drop_says_it_continues_from_the_runs_cut(tmp_path):
    model = _tiny_model(tmp_path)
    assert run_cli("data", "export", "fashion-mnist", str(tmp_path / "fm"), "--limit", "40").returncode == 0
    run = str(tmp_path / "run")
    common = ["-d", str(tmp_path / "fm"), "--img-size", "16", "-b", "16"]
    proc = run_cli("finetune", model, *common, "-e", "2", "-p", "fixed:3@1", "-o", run, "--limit", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 20 // 4 = 5, fewer than the 10 classes: one validation image per class
    assert "20 training and 10 validation images (--limit 20: class-balanced subsets of both)" in proc.stdout
    proc = run_cli("update", run, "-d", str(tmp_path / "fm"), "-e", "1", "--model-file", model)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if "drop:" in ln)
    assert line.startswith("no further drop: the update continued from the run's cut after 3;"), line
    assert "the fixed drop after 3, due after 1 epochs, was made before" in line


def _tiny_report(tmp_path: Path, cost: StepCosts | None = None, **kw) -> ModelReport:
    report = inspect_model(_tiny_model(tmp_path), 16, **kw)
    return report if cost is None else replace(report, cost=cost(report.graph))


def test_inspect_lists_one_cut_per_set_of_frozen_parameters_the_one_a_drop_chooses(tmp_path):
    report = _tiny_report(tmp_path)
    rows, cps = report.rows(), report.graph.cut_points
    named = sorted([r["index"] for r in rows] + [a["index"] for r in rows for a in r["alternatives"]])
    assert named == list(range(len(cps)))  # every cut point once
    for r in rows:  # the alternatives freeze the same parameters
        assert {cps[a["index"]].prefix_params for a in r["alternatives"]} <= {r["prefix_params"]}
    # the cost model, asked for its candidates over the whole model, picks the same cuts
    costs = StepCosts(report.graph, [1.0] * len(report.graph.segments), 8, lambda k: 1e9)
    assert [r["index"] for r in rows] == costs.candidates(-1, len(cps) - 1)


def test_pays_after_is_the_cache_builds_cost_over_what_each_epoch_saves(tmp_path):
    def hand_made(dg):
        # every segment's forward takes 1 s but the first's (0 s); reading a cache is free; writing
        # at cut 3 takes 30 s for 200 samples (100 images, 2 views)
        n = len(dg.segments)
        write = dg.cut_points[3].bytes_per_sample * 200 / 30
        return StepCosts(
            dg, [0.0] + [1.0] * (n - 1), 10, lambda k: math.inf, train_s=[3.0] * n, write_bytes_per_s=write
        )

    report = _tiny_report(tmp_path, cost=hand_made, images=100)
    pays = {r["index"]: r["pays_after_epochs"] for r in report.rows()}
    # cut 0: the prefix costs nothing to recompute, so a cache never pays
    # cut 3: 3 s of prefix per step; 10 steps an epoch save 30 s; the build: 20 batches x 3 s + 30 s
    # of writing = 90 s: 3 epochs. cut 4: 40 s saved an epoch; 20 x 4 s + 60 s (twice the bytes)
    assert (pays[0], pays[3], pays[4]) == (None, 3, 4)


def test_inspect_cost_table_fits_80_columns_and_its_caption_names_every_column(tmp_path):
    report = inspect_model("timm:resnet18", 32, cost=True, batch_size=4)
    screen = Console(width=80, record=True, file=open(os.devnull, "w"))
    table = render.cut_table(report)
    screen.print(table)
    text = screen.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    for r in report.rows():  # numbers are whole, never cut or folded
        line = next(ln for ln in text.splitlines() if ln.split()[:1] == [str(r["index"])])
        assert "x".join(map(str, r["shape"])) in line and f"{r['suffix_params']:,}" in line, line
    caption = " ".join(table.caption.split())
    for col in table.columns:
        assert " ".join(str(col.header).split()) in caption, col.header


def test_inspect_cost_json_is_an_object_with_the_step_and_the_bandwidth(tmp_path):
    proc = run_cli(
        "inspect",
        _tiny_model(tmp_path),
        "--img-size",
        "16",
        "--cost",
        "--batch-size",
        "4",
        "--json",
        "--images",
        "500",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["img_size"] == 16 and out["images"] == 500 and out["batch_size"] == 4
    assert out["step_ms"] > 0 and out["bandwidth_bytes_per_s"] > 0
    # the whole model's step: more than a step after any cut, which skips work
    assert all(out["step_ms"] > r["step_ms"] for r in out["rows"])
    assert {"freeze_only_step_ms", "pays_after_epochs", "alternatives"} <= out["rows"][0].keys()
