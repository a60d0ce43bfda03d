"""Fault injection: the `fxdrop` command killed, interrupted, starved of disk, refused, raced and
fed bad input. Every fault ends in one line on stderr (or a resume that finishes the same run),
and nothing the user made, and no earlier result, is lost.

Faults are injected into the real command: `_run` starts `fxdrop_cli.main.main()` in a fresh
interpreter after patching one library function to kill or interrupt the process at a chosen
point (or to find the disk full), so each point is hit deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY_CNN, needs_fmnist
from helpers import one_line as _one_line

pytestmark = needs_fmnist


# fault name -> code run before the CLI: patches one function to fail at its N-th call
FAULTS = {
    # SIGKILL while the 3rd cache shard is being written (shards made tiny so there are many)
    "kill-cache": """
import fxdrop.cache.format as f
f._SHARD_BYTES = 4096
real = f._ShardWriter.put
n = [0]
def put(self, name, tensors):
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, tensors)
f._ShardWriter.put = put
""",
    # SIGKILL after the 2nd checkpoint's temporary file is written, before its rename
    "kill-checkpoint": """
import fxdrop._io as io
real = os.replace
n = [0]
def replace(src, dst):
    if str(dst).endswith("checkpoint.pt"):
        n[0] += 1
        if n[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
io.os.replace = replace
""",
    # SIGKILL, SIGINT or SIGTERM in the middle of epoch 2 (the 12th step; 8 steps per epoch)
    **{
        name: f"""
import fxdrop.engine.loop as fit
real = fit.train_step
n = [0]
def step(*a, **k):
    n[0] += 1
    if n[0] == 12:
        os.kill(os.getpid(), signal.{sig})
    return real(*a, **k)
fit.train_step = step
"""
        for name, sig in (("kill-step", "SIGKILL"), ("int-step", "SIGINT"), ("term-step", "SIGTERM"))
    },
    # the file systems under --out and --cache-dir are read-only (as root, permissions would not stop
    # a write, so the refusal the kernel gives is injected where fxdrop first writes: the lock)
    "read-only": """
import fxdrop._io as io
real = io.os.open
def ro_open(path, *a, **k):
    if str(path).endswith(".fxdrop.lock") and os.environ["FXDROP_TEST_RO"] in str(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real(path, *a, **k)
io.os.open = ro_open
""",
    # the disk under --out fills up when the exported model is written
    "full-disk-export": """
import safetensors.torch as st
import fxdrop._io as io
def save_file(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
io.save_file = save_file
""",
    # hold the run for a while after its first step (to race a second process against it)
    "slow": """
import time
import fxdrop.engine.loop as fit
real = fit.train_step
def step(*a, **k):
    time.sleep(3)
    return real(*a, **k)
fit.train_step = step
""",
}


def _run(
    *args: str, fault: str | None = None, cwd: Path | None = None, wait: bool = True, env: dict | None = None
):
    prelude = "import os, signal, errno, sys\n" + textwrap.dedent(FAULTS[fault] if fault else "")
    code = prelude + "\nimport fxdrop_cli.main as m\nsys.argv = ['fxdrop', *sys.argv[1:]]\nm.main()\n"
    env = (
        {k: v for k, v in os.environ.items() if k != "FXDROP_DEBUG"}
        | {"COLUMNS": "200", "OMP_NUM_THREADS": "1"}
        | (env or {})
    )
    cmd = [sys.executable, "-c", code, *args]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(TINY_CNN)
    return path


# every resume is tried with a fixed drop and with the default policy (no --policy)
POLICIES = ["fixed:4@1", "default"]


def _args(model_file: Path, out: Path, *extra: str, policy: str = "fixed:4@1") -> list[str]:
    chosen = [] if policy == "default" else ["--policy", policy]
    return [
        "finetune",
        f"{model_file}:build",
        "--data",
        "fashion-mnist",
        "--limit",
        "256",
        "--img-size",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        *chosen,
        "--out",
        str(out),
        *extra,
    ]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def references(model_file, tmp_path_factory):
    """Uninterrupted runs, one per policy: every resumed run must end with the same model, byte
    for byte."""
    made: dict[str, Path] = {}

    def reference(policy: str = "fixed:4@1") -> Path:
        if policy not in made:
            out = tmp_path_factory.mktemp("ref") / "run"
            proc = _run(*_args(model_file, out, policy=policy))
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[policy] = out
        return made[policy]

    return reference


@pytest.fixture(scope="module")
def reference(references) -> Path:
    return references()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "fault,code",
    [("kill-cache", -9), ("kill-checkpoint", -9), ("kill-step", -9), ("term-step", 143), ("int-step", 130)],
)
def test_killed_or_terminated_run_resumes_to_the_same_model(
    model_file, references, tmp_path, fault, code, policy
):
    if fault == "kill-cache" and policy == "default":
        pytest.skip("the default policy builds no cache in this short run; nothing to kill there")
    out = tmp_path / "run"
    proc = _run(*_args(model_file, out, policy=policy), fault=fault)
    assert proc.returncode == code, proc.stderr[-3000:]
    if code > 0:
        _one_line(proc, "interrupted", "--resume", code=code)
    assert not (out / "model.safetensors").exists()
    resumed = _run(*_args(model_file, out, "--resume", policy=policy))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _digest(out / "model.safetensors") == _digest(references(policy) / "model.safetensors")
    assert not list(out.glob(".*.tmp"))  # no leftover of the killed write
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # numbered as on screen


def test_identical_runs_write_identical_files_with_ordinary_permissions(model_file, reference, tmp_path):
    out = tmp_path / "again"
    assert _run(*_args(model_file, out)).returncode == 0
    assert _digest(out / "model.safetensors") == _digest(reference / "model.safetensors")
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "metrics.json").stat().st_mode & 0o777


def test_full_disk_is_one_line_and_keeps_the_checkpoint(model_file, tmp_path):
    out = tmp_path / "run"
    _one_line(_run(*_args(model_file, out), fault="full-disk-export"), "disk is full", "model.safetensors")
    assert (out / "checkpoint.pt").exists() and not (out / "model.safetensors").exists()
    assert not list(out.glob(".*.tmp"))


def test_a_second_process_on_the_same_out_or_cache_is_refused_naming_the_first(model_file, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = _run(*_args(model_file, out, "--cache-dir", str(cache)), fault="slow", wait=False)
    try:
        deadline = time.monotonic() + 120
        while (
            not ((out / ".fxdrop.lock").exists() and (cache / ".fxdrop.lock").exists())
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        time.sleep(0.5)
        same_out = _run(*_args(model_file, out, "--overwrite"))
        _one_line(same_out, "in use by process", str(first.pid))
        same_cache = _run(*_args(model_file, tmp_path / "other", "--cache-dir", str(cache)))
        _one_line(same_cache, "in use by process", str(first.pid))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


BAD = [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--cache-views", "0"], "--cache-views"),
    (["--cache-dtype", "fp64"], "--cache-dtype"),
    (["--batch-size", "0"], "--batch-size"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--policy", "sometimes"], "unknown policy"),
    (["--policy", "fixed:4@7"], "--epochs"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_options_are_one_line_before_anything_is_written(model_file, tmp_path, extra, needle):
    out = tmp_path / "run"
    args = _args(model_file, out)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    _one_line(_run(*args), needle)
    assert not out.exists()


def test_a_factory_that_raises_is_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("def build(num_classes=10):\n    raise ValueError('no such width')\n")
    _one_line(
        _run(
            "finetune",
            f"{tmp_path / 'bad.py'}:build",
            "--data",
            "fashion-mnist",
            "--out",
            str(tmp_path / "o"),
        ),
        "build()",
        "ValueError",
        "no such width",
    )


@pytest.mark.parametrize("policy", POLICIES)
def test_resume_with_more_epochs_records_them(model_file, tmp_path, policy):
    out = tmp_path / "run"
    assert _run(*_args(model_file, out, policy=policy)).returncode == 0
    args = _args(model_file, out, "--resume", policy=policy)
    args[args.index("--epochs") + 1] = "4"
    assert _run(*args).returncode == 0
    assert json.loads((out / "config.json").read_text())["config"]["epochs"] == 4
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 4


@pytest.mark.parametrize("which", ["out", "cache"])
def test_read_only_folders_are_one_line_before_training(model_file, tmp_path, which):
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = _run(
        *_args(model_file, out, "--cache-dir", str(cache)),
        fault="read-only",
        env={"FXDROP_TEST_RO": str(out if which == "out" else cache)},
    )
    _one_line(proc, "read-only", str(out if which == "out" else cache))
    assert "epoch 1" not in proc.stdout  # refused before any training


def test_a_diverging_run_stops_with_one_line_and_exports_nothing(model_file, tmp_path):
    out = tmp_path / "run"
    _one_line(_run(*_args(model_file, out, "--lr", "1e12")), "diverged", "--lr")
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def test_damaged_images_are_skipped_and_reported_on_screen(model_file, tmp_path):
    assert _run("data", "export", "fashion-mnist", str(tmp_path / "fm"), "--limit", "60").returncode == 0
    victim = next((tmp_path / "fm" / "train").glob("*/*.png"))
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    proc = _run(
        "finetune",
        f"{model_file}:build",
        "--data",
        str(tmp_path / "fm"),
        "--img-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--policy",
        "none",
        "--out",
        str(tmp_path / "run"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped 1 unreadable image" in proc.stdout


@pytest.mark.parametrize("policy", POLICIES)
def test_a_killed_update_resumes_to_the_same_model(model_file, references, tmp_path, policy):
    whole, killed = (
        Path(shutil.copytree(references(policy), tmp_path / name)) for name in ("whole", "killed")
    )

    def update(out: Path, *extra: str) -> list[str]:  # 64 more images than the run's 256: 10 steps per epoch
        return ["update", str(out), "--data", "fashion-mnist", "--limit", "320", "--epochs", "2", *extra]

    assert _run(*update(whole)).returncode == 0
    proc = _run(*update(killed), fault="kill-step")  # killed in the update's 2nd epoch
    assert proc.returncode == -9, proc.stderr[-3000:]
    again = _run(*update(killed))
    _one_line(again, "interrupted", "--resume")
    resumed = _run(*update(killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _digest(killed / "model.safetensors") == _digest(whole / "model.safetensors")
    updates = json.loads((killed / "metrics.json").read_text())["updates"]
    assert len(updates) == 1 and [e["epoch"] for e in updates[0]["epochs"]] == [1, 2]
    assert updates[0]["new_samples"] == 64 + 16  # 64 training and 16 validation images
