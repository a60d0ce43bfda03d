"""update: a finished run trains on, on data that arrived (or left) since; the frozen prefix runs
only on what is new. `update` takes datasets, `update_folder` an ImageFolder tree (the CLI's
`fxdrop update`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from .cache import sample_keys
from .config import FitConfig
from .data import build_data
from .engine import EventFn, FitResult
from .engine.loop import execute
from .engine.update_run import UPDATE_CHECKPOINT, StartPoint, UpdatePlan, UpdateStart, UpdateWrites
from .errors import ConfigError, DataError, FxdropError, ModelSourceError, RunDirError
from .messages import Entry, Param
from .model_files import is_file_spec, trusted
from .models import create_model
from .policies import policy_from_description
from .records import Finetuned, RunConfig, emitter
from .runs import RunDir

__all__ = ["update", "update_folder"]

REPLAY = ("all", "new")


def update(
    out_dir: str | Path,
    train_data: Dataset,
    val_data: Dataset,
    *,
    model: nn.Module | None = None,
    model_file: str | None = None,
    epochs: int = 2,
    replay: str = "all",
    resume: bool = False,
    data_name: str | None = None,
    on_event: EventFn | None = None,
    **config: Any,
) -> FitResult:
    """Continue the finished run in `out_dir` on `train_data` / `val_data` (the run's classes, more
    images, fewer, or others).

    The update starts from the run's weights (`model.safetensors`), its cut and its policy state,
    and trains `epochs` epochs with a fresh schedule (no warm-up); the cut may advance further.
    At its cut, only samples the activation cache lacks pass through the frozen prefix (a
    sample is the same when its `sample_keys()` entry is: for image folders, the relative path
    and the content hash); samples that left the data leave the cache. A run that ended without
    its cache rebuilds it from the images.

    Args:
        out_dir: the folder of a finished `fit`/`finetune` run (or of an earlier update).
        train_data: map-style dataset of `(image, label)`, best one of fxdrop's (with sample keys).
        val_data: the validation dataset.
        model: the run's model, built but untrained; None builds it from the model spec the run
            recorded (runs made by `finetune`).
        model_file: a run made from a Python file (`path.py:FACTORY`) is rebuilt only when this
            names the same spec again: fxdrop imports no code that a run folder names.
        epochs: epochs to train.
        replay: "all" trains on every training sample, "new" only on those the run never saw.
        resume: finish an update that was interrupted (same data and `replay`).
        data_name: what the data is (e.g. its folder), recorded in metrics.json.
        on_event: progress callback, as for `fit`.
        **config: `fit` settings to change for the update (lr, batch_size, device, num_workers, ...).

    Returns:
        The FitResult of the update; `result.update` is its entry in metrics.json "updates".

    Example:
        >>> fxdrop.update("runs/demo", train_ds, val_ds, epochs=2, replay="new").update["new_samples"]
    """
    _check_update_args(epochs, replay)
    saved = _read_run(Path(out_dir), resume)
    return _update(
        saved, out_dir, train_data, val_data, model, model_file, epochs, replay, data_name, on_event, config
    )


def _check_update_args(epochs: int, replay: str) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError("epochs", f"must be a positive whole number, got {epochs!r}")
    if replay not in REPLAY:
        raise ConfigError("replay", f"must be one of {', '.join(REPLAY)}, got {replay!r}")


def _update(
    saved: dict[str, Any],
    out_dir: str | Path,
    train_data: Dataset,
    val_data: Dataset,
    model: nn.Module | None,
    model_file: str | None,
    epochs: int,
    replay: str,
    data_name: str | None,
    on_event: EventFn | None,
    config: dict[str, Any],
) -> FitResult:
    """`update` from the run as `_read_run` read it (read once per update)."""
    run_config: RunConfig = saved["config"]
    asked = {"epochs": epochs, "warmup_epochs": 0.0, "extra": run_config.notes}
    cfg = FitConfig.from_kwargs(run_config.settings | asked | config)
    if model is None:
        model = _build_model(run_config.finetuned, model_file)
    _load_exported(model, Path(out_dir) / "model.safetensors")
    plan = _plan(saved, train_data, val_data, replay, data_name or type(train_data).__name__)
    policy = policy_from_description(run_config.policy)
    data = {"train": train_data, "val": val_data}
    update_start = UpdateStart(plan)  # the fit's loop, with an update's start and outputs
    return execute(
        model,
        data,
        policy,
        out_dir,
        saved["resuming"],
        False,
        on_event,
        cfg,
        update_start,
        UpdateWrites(update_start),
    )


def _plan(
    saved: dict[str, Any], train_data: Dataset, val_data: Dataset, replay: str, data_name: str
) -> UpdatePlan:
    """Where the update starts (as `_read_run` read the run) and what it trains on: the samples
    compared by key with those the run saw."""
    keys = {"train": sample_keys(train_data), "val": sample_keys(val_data)}
    before = saved["samples"] or {
        "train": torch.empty(0, dtype=torch.long),
        "val": torch.empty(0, dtype=torch.long),
    }
    seen = {split: set(before.get(split, torch.empty(0)).tolist()) for split in ("train", "val")}
    now = {split: set(k.tolist()) for split, k in keys.items()}
    positions = None
    if replay == "new":
        positions = torch.tensor(
            [p for p, k in enumerate(keys["train"].tolist()) if k not in seen["train"]], dtype=torch.long
        )
        if len(positions) == 0:
            raise DataError(
                "no training image is new to this run; {new} has nothing to train on (use {all} to train "
                "on every image)",
                new=Param("replay", "new"),
                all=Param("replay", "all"),
            )
    start: StartPoint = saved["start"]
    return UpdatePlan(
        index=saved["index"],
        cut=start.cut,
        policy_state=start.policy_state,
        data=data_name,
        replay=replay,
        new_samples=sum(len(now[s] - seen[s]) for s in now),
        removed_samples=sum(len(seen[s] - now[s]) for s in now),
        train_positions=positions,
        interrupted=saved["interrupted"],
    )


def update_folder(
    out_dir: str | Path,
    data: str,
    *,
    limit: int | None = None,
    epochs: int = 2,
    replay: str = "all",
    resume: bool = False,
    on_event: EventFn | None = None,
    model_file: str | None = None,
    **config: Any,
) -> FitResult:
    """:func:`update` on an ImageFolder tree `data` (`train/<class>/*`, `val/<class>/*`) with the
    run's classes, read at the run's image size, transforms and seed (what `fxdrop update` runs).

    Example:
        >>> update_folder("runs/demo", "./images-week-2", epochs=2)
    """
    _check_update_args(epochs, replay)
    saved = _read_run(Path(out_dir), resume)
    made = saved["config"].finetuned
    if made.model is None or made.img_size is None:
        raise RunDirError(
            "'{out}' was not made by {finetune}: its config.json names no model spec; use the Python "
            "API's fxdrop.update with your model and datasets",
            out=out_dir,
            finetune=Entry("finetune"),
        )
    probe = _build_model(made, model_file)
    try:
        bundle = build_data(
            data,
            made.img_size,
            model=probe,
            limit=limit,
            seed=saved["config"].seed,
            augment=made.augment,
            classes=made.classes,
        )
    except DataError as exc:
        raise DataError(
            "{error} (the run in '{out}' was trained on these classes)", error=exc.message, out=out_dir
        ) from exc
    if on_event is not None:
        emitter(on_event)(bundle.summary())
    return _update(
        saved,
        out_dir,
        bundle.train,
        bundle.val,
        probe,
        model_file,
        epochs,
        replay,
        bundle.source,
        on_event,
        config,
    )


def _read_run(out: Path, resume: bool) -> dict[str, Any]:
    """What an update needs from a finished run: its config, where to start (the last finished
    update, else the run's last checkpoint), the samples it saw, this update's number, and
    whether an interrupted update is to be resumed."""
    # under torchrun every rank reads the run; one of them holds the folder's lock meanwhile
    run = RunDir.finished(out, lock=int(os.environ.get("RANK", "0")) == 0)
    try:
        config, metrics = run.read_config(), run.read_metrics()
        interrupted, start = None, None
        if (out / UPDATE_CHECKPOINT).exists():
            last = run.load_checkpoint(UPDATE_CHECKPOINT)
            start = StartPoint.of(last)
            interrupted = last if start.interrupted else None
        if interrupted is not None and not resume:
            raise RunDirError(
                "an update of '{out}' was interrupted; pass {resume} to finish it",
                out=out,
                resume=Param("resume", True),
            )
        if start is None:
            if not (out / "checkpoint.pt").exists():
                raise RunDirError(
                    f"'{out}' has no checkpoint.pt to continue from; an update needs the run's checkpoint"
                )
            start = StartPoint.of(run.load_checkpoint())
        return {
            "config": config,
            "start": start,
            "index": start.index if start.interrupted else len(metrics.updates),
            "samples": run.read_samples(),
            "resuming": interrupted is not None,
            "interrupted": interrupted,
        }
    finally:
        run.release()


def _build_model(made: Finetuned, model_file: str | None = None) -> nn.Module:
    """The run's model, untrained, from the spec its config.json names. A spec that is a Python
    file (`path.py:FACTORY`) is built only when this user ran that file, with this content, in a
    `finetune` here (`model_files`), or the caller names the same spec again (`model_file`): a
    run folder is input from outside, and fxdrop imports no code only because it names it."""
    if made.model is None or not made.classes:
        raise FxdropError(  # `model=` is the Python API's alone: no command takes a module
            "this run's config.json names no model spec and classes; pass `model=` (your module, "
            "built as for the run)"
        )
    spec = made.model
    if is_file_spec(spec) and model_file != spec and not trusted(spec):
        raise FxdropError(
            "this run's model is built by the Python file '{spec}' its config.json names, which you have "
            "not run here with this content, and fxdrop imports no code a run folder names; check that "
            "file, then name it again with {model_file}, or pass your model",
            spec=spec,
            model_file=Param("model_file", spec),
        )
    return create_model(spec, num_classes=len(made.classes), pretrained=False)


def _load_exported(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise RunDirError(f"'{path}' is missing; an update starts from the run's exported model")
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ModelSourceError(
            f"'{path}' does not fit the model given for the update ({str(exc).splitlines()[0]})"
        ) from exc
