"""The `fxdrop` command: output, and one clear line with a non-zero exit for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def fxdrop(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FXDROP_DEBUG"} | {"COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fxdrop_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_inspect_json_lists_cut_points():
    proc = fxdrop("inspect", "timm:resnet18", "--img-size", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) > 10
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
    proc = fxdrop("inspect", "torchvision:resnet18", "--img-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "layer2.1" in proc.stdout and "MiB fp32" in proc.stdout


def test_inspect_user_file_factory(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))\n"
    )
    proc = fxdrop("inspect", f"{tmp_path / 'net.py'}:build", "--img-size", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["module"] for r in json.loads(proc.stdout)][:2] == ["0", "1"]


def test_unknown_model_names_close_matches():
    _one_error_line(fxdrop("inspect", "timm:resnet153"), "resnet153", "resnet152")


def test_missing_data_dir(tmp_path):
    _one_error_line(
        fxdrop(
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
        fxdrop(
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


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist not installed"
)
def test_finetune_on_exported_folder_then_refuses_to_clobber(tmp_path):
    assert fxdrop("data", "export", "fashion-mnist", str(tmp_path / "fm"), "--limit", "60").returncode == 0
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
    proc = fxdrop(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "drop" in proc.stdout and "summary" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["events"][0]["module"] == "layer1"
    _one_error_line(fxdrop(*args), "already holds a run", "--resume")
    _one_error_line(fxdrop(*args[:-2], "--policy", "fixed:layer9@1", "--overwrite"), "layer9")
    # the bad cut was found before --overwrite deleted anything
    assert (tmp_path / "run" / "model.safetensors").exists()
