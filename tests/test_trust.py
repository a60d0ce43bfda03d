"""No file in a run folder, and no `--weights` file, can run code: checkpoints are read with
torch's weights-only unpickler, a tampered one is refused with one line naming it, and run
folders written before the checkpoint's format marker still resume."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CNN, needs_fmnist, one_line, run_cli, tiny_model
from torch import nn

import fxdrop
from fxdrop.finetuning import load_weights
from fxdrop.runs import CHECKPOINT_VERSION


class Payload:
    """Unpickled, it creates the file `marker` (what an attacker's `__reduce__` would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tamper(path: Path, marker: Path, how: str) -> None:
    """Replace `path` with a checkpoint-looking file whose unpickling creates `marker`; check
    that loading it the unsafe way does run the payload, so the refusals below mean something."""
    forged = {"format": "fxdrop-checkpoint", "version": 2, "policy": {}, "model": Payload(marker)}
    if how == "torch.save":
        torch.save(forged, path)
        torch.load(path, weights_only=False)
    else:  # a raw pickle, not torch's zip format
        path.write_bytes(pickle.dumps(forged))
        pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()


@pytest.fixture(scope="module")
def toy_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 3, 8, 8, generator=g), torch.randint(0, 4, (80,), generator=g)
    return torch.utils.data.TensorDataset(x[:64], y[:64]), torch.utils.data.TensorDataset(x[64:], y[64:])


class Interrupt(Exception):
    pass


def _fit(data, out: Path, **kw) -> fxdrop.FitResult:
    kw = {"policy": fxdrop.Fixed(2, 1), "epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 0} | kw
    return fxdrop.fit(tiny_model(), *data, out_dir=out, **kw)


def _fit_interrupted(data, out: Path, **kw) -> None:
    """A 2-epoch run stopped in its 2nd epoch: checkpoint.pt holds the end of epoch 1."""

    def stop(kind, info):
        if kind == "step" and info["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(data, out, on_event=stop, **kw)


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint in the layout fxdrop wrote before format 2: no "format"/"version"
    marker and no numpy RNG state (its other fields are what format 1 held)."""
    ck = torch.load(path, weights_only=True)
    assert ck.pop("format") == "fxdrop-checkpoint" and ck.pop("version") == CHECKPOINT_VERSION
    for rank_state in ck.get("rng", []):
        del rank_state["numpy"]
    torch.save(ck, path)


# ---- tampered run folders are refused, and nothing in them runs -------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_tampered_checkpoint_is_refused_by_fit_resume_and_never_runs(toy_data, tmp_path, how):
    _fit_interrupted(toy_data, tmp_path / "run")
    ck, marker = tmp_path / "run" / "checkpoint.pt", tmp_path / "pwned"
    _tamper(ck, marker, how)
    with pytest.raises(fxdrop.RunDirError) as err:
        _fit(toy_data, tmp_path / "run", resume=True)
    message = str(err.value)
    assert str(ck) in message and "\n" not in message and "nothing in it was loaded" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "forged,needle",
    [
        ({"model": {"0.weight": torch.ones(1)}}, "not an fxdrop checkpoint"),  # plain, but not ours
        ([torch.ones(1)], "not an fxdrop checkpoint"),
        ({"format": "fxdrop-checkpoint", "version": CHECKPOINT_VERSION + 1, "policy": {}}, "newer"),
    ],
    ids=["state-dict", "list", "newer-version"],
)
def test_a_plain_checkpoint_fxdrop_did_not_write_is_refused(toy_data, tmp_path, forged, needle):
    _fit_interrupted(toy_data, tmp_path / "run")
    torch.save(forged, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(fxdrop.RunDirError, match=needle) as err:
        _fit(toy_data, tmp_path / "run", resume=True)
    assert str(tmp_path / "run" / "checkpoint.pt") in str(err.value)


class NumpyStatePolicy(fxdrop.policies.Policy):
    """Keeps a numpy array in its state: a checkpoint must refuse it when written, not when read."""

    def init_state(self, segments):
        return {"segments": segments, "seen": np.zeros(2)}

    def target(self, state, epoch, epochs, dropped):
        return -1, {}

    def describe(self):
        return {"name": "NumpyStatePolicy"}


def test_a_policy_state_that_is_not_plain_data_is_refused_when_written(toy_data, tmp_path):
    with pytest.raises(fxdrop.RunDirError, match=r"numpy\.ndarray at \['policy'\]\['seen'\]"):
        _fit(toy_data, tmp_path / "run", policy=NumpyStatePolicy())


# ---- run folders written before format 2 still resume ------------------------------------------


def test_a_format_1_checkpoint_resumes_to_the_same_model(toy_data, tmp_path):
    whole = _fit(toy_data, tmp_path / "whole")
    _fit_interrupted(toy_data, tmp_path / "old")
    _as_format_1(tmp_path / "old" / "checkpoint.pt")
    resumed = _fit(toy_data, tmp_path / "old", resume=True)
    # the run draws nothing from numpy's global generator, so format 1 loses nothing
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.cut == whole.cut
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    written = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    assert written["version"] == CHECKPOINT_VERSION and "numpy" in written["rng"][0]


def test_an_update_starts_from_a_format_1_update_checkpoint(toy_data, tmp_path):
    train, val = toy_data
    _fit(toy_data, tmp_path / "run", epochs=1, policy=fxdrop.Fixed(2, 0))
    first = fxdrop.update(tmp_path / "run", train, val, model=tiny_model(), epochs=1, batch_size=16)
    _as_format_1(tmp_path / "run" / "update.pt")  # a finished update: its cut and policy state
    second = fxdrop.update(tmp_path / "run", train, val, model=tiny_model(), epochs=1, batch_size=16)
    assert second.update["update"] == 2 and second.update["cut_before"] == first.update["cut"]


def test_the_numpy_generator_resumes_where_it_was(toy_data, tmp_path):
    """A dataset that draws from numpy's global generator sees the same numbers after a resume."""
    draws: dict[str, list[float]] = {"whole": [], "resumed": []}

    class NumpyNoise(torch.utils.data.Dataset):
        def __init__(self, base, into):
            self.base, self.into = base, into

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y = self.base[i]
            self.into.append(float(np.random.rand()))
            return x, y

    train, val = toy_data
    _fit((NumpyNoise(train, draws["whole"]), val), tmp_path / "whole", policy=fxdrop.NoDrop())
    out = tmp_path / "resumed"
    _fit_interrupted((NumpyNoise(train, []), val), out, policy=fxdrop.NoDrop())
    np.random.seed(12345)  # another process would start from another state
    _fit((NumpyNoise(train, draws["resumed"]), val), out, policy=fxdrop.NoDrop(), resume=True)
    # the 2nd epoch's draws (whatever was drawn before training, building the run, comes first)
    assert (
        len(draws["resumed"]) > len(train)
        and draws["resumed"][-len(train) :] == draws["whole"][-len(train) :]
    )


# ---- --weights ----------------------------------------------------------------------------------


def test_weights_saved_from_a_ddp_model_load_without_their_prefix(tmp_path):
    source = tiny_model()
    for p in source.parameters():
        nn.init.normal_(p)
    ddp_names = {f"module.{k}": v for k, v in source.state_dict().items()}  # what DDP's state_dict gives
    torch.save(ddp_names, tmp_path / "ddp.pth")
    model = tiny_model()
    loaded = load_weights(model, tmp_path / "ddp.pth")
    assert loaded.loaded == len(ddp_names) and not loaded.unused and not loaded.missing
    assert "prefix 'module.' removed" in loaded.describe()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_model_whose_own_names_start_with_module_keeps_them(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = tiny_model()

    source = Wrapper()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = load_weights(Wrapper(), tmp_path / "w.pth")
    assert loaded.loaded == len(source.state_dict()) and loaded.prefix == ""


def test_weights_that_do_not_fit_are_still_refused(tmp_path):
    torch.save({f"module.other.{i}": torch.ones(3) for i in range(6)}, tmp_path / "other.pth")
    with pytest.raises(fxdrop.ModelSourceError, match="do not fit this model"):
        load_weights(tiny_model(), tmp_path / "other.pth")


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_weights_file_with_a_payload_is_refused_and_never_runs(tmp_path, how):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    _tamper(path, marker, how)
    with pytest.raises(fxdrop.ModelSourceError, match="weights only") as err:
        load_weights(tiny_model(), path)
    assert str(path) in str(err.value) and not marker.exists()


# ---- the command: one line, exit 1, nothing runs ------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished one-epoch `finetune` run (with an update) and the arguments that made it."""
    root = tmp_path_factory.mktemp("cli")
    (root / "net.py").write_text(TINY_CNN)
    args = ["finetune", f"{root / 'net.py'}:build", "--data", "fashion-mnist", "--limit", "64"]
    args += ["--img-size", "16", "--epochs", "1", "--batch-size", "32", "--policy", "fixed:4@0"]
    args += ["--out", str(root / "run")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = f"{root / 'net.py'}:build"
    proc = run_cli(
        "update",
        str(root / "run"),
        "--data",
        "fashion-mnist",
        "--limit",
        "80",
        "--epochs",
        "1",
        "--model-file",
        spec,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", args


@needs_fmnist
def test_update_imports_no_model_file_a_run_folder_names_unless_named_again(cli_run, tmp_path):
    run, args = cli_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    # the model file the run's config.json names, with a payload added since
    evil = tmp_path / "net.py"
    evil.write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n" + TINY_CNN)
    config = json.loads((out / "config.json").read_text())
    config["config"]["extra"]["model"] = f"{evil}:build"
    (out / "config.json").write_text(json.dumps(config))
    proc = run_cli("update", str(out), "--data", "fashion-mnist", "--limit", "80", "--epochs", "1")
    one_line(proc, f"{evil}:build", code=1)
    assert "--model-file" in proc.stderr and not (tmp_path / "pwned").exists()


@needs_fmnist
def test_finetune_resume_refuses_a_tampered_checkpoint_in_one_line(cli_run, tmp_path):
    run, args = cli_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    _tamper(out / "checkpoint.pt", tmp_path / "pwned", "torch.save")
    proc = run_cli(*args[:-1], str(out), "--resume")
    one_line(proc, str(out / "checkpoint.pt"), code=1)
    assert not (tmp_path / "pwned").exists()


@needs_fmnist
@pytest.mark.parametrize("name", ["update.pt", "checkpoint.pt"])
def test_update_refuses_a_tampered_checkpoint_in_one_line(cli_run, tmp_path, name):
    run, _ = cli_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    if name == "checkpoint.pt":
        (out / "update.pt").unlink()  # an update then starts from the run's checkpoint
    _tamper(out / name, tmp_path / "pwned", "pickle")
    spec = json.loads((out / "config.json").read_text())["config"]["extra"]["model"]
    proc = run_cli(
        "update", str(out), "--data", "fashion-mnist", "--limit", "80", "--epochs", "1", "--model-file", spec
    )
    one_line(proc, str(out / name), code=1)
    assert not (tmp_path / "pwned").exists()


@needs_fmnist
def test_finetune_refuses_a_weights_file_with_a_payload_in_one_line(cli_run, tmp_path):
    _, args = cli_run
    evil = tmp_path / "evil.pth"
    _tamper(evil, tmp_path / "pwned", "torch.save")
    proc = run_cli(*args[:-1], str(tmp_path / "out"), "--weights", str(evil))
    one_line(proc, str(evil), "weights only", code=1)
    assert not (tmp_path / "pwned").exists()


def test_a_model_file_is_trusted_only_as_this_user_ran_it(tmp_path, monkeypatch):
    from fxdrop import model_files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    net = tmp_path / "net.py"
    net.write_text(TINY_CNN)
    spec = f"{net}:build"
    assert not model_files.trusted(spec)  # never run here
    model_files.remember(spec)
    assert model_files.trusted(spec)
    net.write_text("import os\n" + TINY_CNN)  # changed since it was run
    assert not model_files.trusted(spec)
    assert not model_files.is_file_spec("timm:resnet18") and model_files.is_file_spec(spec)
