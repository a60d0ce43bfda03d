"""A run's output folder: config, checkpoint, metrics and the exported model, all written
atomically, under an advisory lock while a run uses it."""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ._io import FolderLock, as_json, atomic_path, os_error, save_safetensors, save_torch, write_json
from .cache import CacheStore
from .errors import RunDirError
from .messages import Entry, Message, Param
from .records import Epoch, Metrics, RunConfig

__all__ = ["RunDir", "export_model", "RUN_FORMAT", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

_OVERWRITE = Param("overwrite", True)  # what replaces a run folder's contents

RUN_FORMAT = "fxdrop-run"  # config.json's "format": how fxdrop recognises its own runs
CHECKPOINT_FORMAT = "fxdrop-checkpoint"  # a checkpoint's "format": how fxdrop recognises its own
# 2: the "format" marker and numpy's RNG state (1: neither; still read)
CHECKPOINT_VERSION = 2
# summary.csv's columns: timm train.py's (without eval_top5), then fxdrop's
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "lr", "cut", "step_seconds")
_OURS = (
    "config.json",
    "metrics.json",
    "model.safetensors",
    "model-best.safetensors",
    "summary.csv",
    "model-ema.safetensors",
    "checkpoint.pt",
    "samples.safetensors",
    "update.pt",
)


def export_model(model: nn.Module, path: str | Path) -> None:
    """The model's state_dict under its original names, as safetensors (shared tensors de-duplicated)."""
    state = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            state[name] = t.clone()  # safetensors refuses aliased tensors; load_state_dict re-ties them
        else:
            state[name] = t
            if key is not None:
                seen[key] = name
    # one metadata key; safetensors writes several in a random order (different file hashes)
    save_safetensors(state, path, metadata={"format": "pt"})


# what torch's weights-only unpickler reads back besides containers, matched by exact type: a
# subclass (numpy.float64 is a float, a namedtuple a tuple) pickles as its own class, refused
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_PLAIN += (torch.Tensor, nn.Parameter)


def _not_plain(obj: Any, where: str = "") -> str | None:
    """What and where (a key path) the first object in `obj` that is not plain data is, or None."""
    kind = type(obj)
    if kind in _PLAIN:
        return None
    if kind in (dict, OrderedDict):
        items = [(f"{where}[{k!r}]", k) for k in obj] + [(f"{where}[{k!r}]", v) for k, v in obj.items()]
    elif kind in (list, tuple, set):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    else:
        return f"a {kind.__module__}.{kind.__qualname__} at {where or 'the top'}"
    return next((found for at, v in items if (found := _not_plain(v, at)) is not None), None)


def _globals_in(path: Path) -> str:
    """' (posix.system, ...)': what the file would have imported, for the message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a damaged archive; the refusal needs no names
        return ""
    return f" ({', '.join(names[:3])})" if names else ""


def _is_run_config(obj: Any) -> bool:
    # runs written before the "format" marker have exactly these keys
    return isinstance(obj, dict) and (
        obj.get("format") == RUN_FORMAT or {"identity", "config", "policy"} <= obj.keys()
    )


class RunDir:
    """The output folder of a run, locked while open. Refuses a folder holding a different run
    unless told to resume or overwrite, and a `config.json` that fxdrop did not write.

    Args:
        path: the folder.
        identity: what makes this run this run (model, data, policy, seed, ...).
        resume: continue the run found there (its identity must match).
        overwrite: delete the run found there (only fxdrop's files) and start anew.
        store: the run's cache store; `overwrite` checks, then removes, its caches.
    """

    def __init__(
        self,
        path: str | Path,
        identity: dict[str, Any],
        resume: bool = False,
        overwrite: bool = False,
        store: CacheStore | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output folder '{self.path}' is a file; give a folder")
        self._lock = FolderLock(self.path, "run folder")
        try:
            self._open(identity, resume, overwrite, store)
        except BaseException:
            self._lock.release()
            raise

    def _open(
        self, identity: dict[str, Any], resume: bool, overwrite: bool, store: CacheStore | None
    ) -> None:
        existing = self.read_json("config.json")
        if existing is not None and not _is_run_config(existing):
            raise RunDirError(
                f"'{self.path / 'config.json'}' was not written by fxdrop; choose another output "
                "folder (fxdrop never replaces files it did not write)"
            )
        self._remove_temporaries()
        has_run = existing is not None or (self.path / "checkpoint.pt").exists()
        self.resuming = False
        if not has_run:
            return
        if overwrite:
            if store is not None:
                store.check()  # everything is checked before anything is deleted
            for name in _OURS:
                (self.path / name).unlink(missing_ok=True)
            if store is not None:
                store.remove_all()
        elif resume:
            old = (existing or {}).get("identity", {})
            identity = as_json(identity)  # the stored copy has been through JSON (inf is null)
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if diff:
                raise RunDirError(
                    "'{path}' holds a different run ({diff} differ); use another output folder or {overwrite}",
                    path=self.path,
                    diff=", ".join(diff),
                    overwrite=_OVERWRITE,
                )
            self.resuming = (self.path / "checkpoint.pt").exists()
        else:
            raise RunDirError(
                "'{path}' already holds a run; pass {resume} to continue it or {overwrite} to replace it",
                path=self.path,
                resume=Param("resume", True),
                overwrite=_OVERWRITE,
            )

    def _remove_temporaries(self) -> None:
        """Leftovers of writes a killed process never finished (the lock says none is running)."""
        for name in _OURS:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise RunDirError(
                "'{path}' is not valid JSON; remove it or use {overwrite}", path=path, overwrite=_OVERWRITE
            ) from exc

    def write_config(self, config: RunConfig) -> None:
        """config.json, marked as fxdrop's (`RUN_FORMAT`, version 1)."""
        write_json(self.path / "config.json", replace(config, format=RUN_FORMAT, version=1).to_json())

    def read_config(self) -> RunConfig | None:
        """config.json as `write_config` (or an older fxdrop) wrote it; None: none."""
        data = self.read_json("config.json")
        return None if data is None else RunConfig.from_json(data)

    def write_metrics(self, metrics: Metrics) -> None:
        """metrics.json: the one place a run's records are written as JSON."""
        write_json(self.path / "metrics.json", metrics.to_json())

    def read_metrics(self) -> Metrics | None:
        """metrics.json as written by `write_metrics` (or by an older fxdrop); None: none yet."""
        data = self.read_json("metrics.json")
        return None if data is None else Metrics.from_json(data)

    def write_summary(self, history: list[Epoch]) -> None:
        """summary.csv, one row per epoch as timm's `train.py` writes it (its columns and units:
        eval_top1 in percent; empty where an epoch was not validated), plus the epoch's cut and
        mean step seconds. Rewritten whole from the epoch records, so a resumed run's rows are its
        checkpoint's epochs."""
        rows = [",".join(SUMMARY_COLUMNS)]
        for h in history:
            top1 = None if h.val_acc is None else 100 * h.val_acc
            values = (h.epoch, h.train_loss, h.val_loss, top1, h.lr, h.cut, h.step_seconds)
            rows.append(",".join("" if v is None else repr(v) for v in values))
        path = self.path / "summary.csv"
        try:
            with atomic_path(path) as tmp:
                tmp.write_text("\n".join(rows) + "\n")
        except OSError as exc:
            raise os_error(exc, path, "file") from exc

    def export(self, model: nn.Module, name: str = "model.safetensors") -> None:
        """The whole model under its original names, written atomically (`model-best.safetensors`:
        the best validated epoch's)."""
        assert name in _OURS, name  # overwrite and the leftover clean-up know only fxdrop's own names
        export_model(model, self.path / name)

    def save_checkpoint(self, state: dict[str, Any], name: str = "checkpoint.pt") -> int:
        """Write a checkpoint atomically; returns its size in bytes. It holds plain data only
        (tensors, numbers, strings, lists, tuples, dicts), which `load_checkpoint` reads back
        without unpickling any object."""
        where = _not_plain(state)
        if where is not None:
            raise RunDirError(
                f"checkpoint '{self.path / name}' would hold {where}; a checkpoint keeps only tensors, "
                "numbers, strings, lists, tuples and dicts (a policy's `checkpoint_state` must return those)"
            )
        save_torch({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION} | state, self.path / name)
        return (self.path / name).stat().st_size

    def load_checkpoint(self, name: str = "checkpoint.pt") -> dict[str, Any]:
        """A checkpoint `save_checkpoint` wrote, read with torch's weights-only unpickler: a file
        holding anything but plain data (code, any other object) is refused and nothing in it runs."""
        path = self.path / name
        foreign = Message(
            "was not written by fxdrop or has been altered; nothing in it was loaded. "
            "Remove it or use {overwrite}",
            overwrite=_OVERWRITE,
        )
        if not zipfile.is_zipfile(path):  # torch.save's format; a raw pickle is never unpickled
            raise RunDirError(
                "checkpoint '{path}' is not in torch's zip format: it {foreign}", path=path, foreign=foreign
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # reason: torch warns of an unusual pickle protocol, then refuses it
                ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # an object the weights-only unpickler refuses
            raise RunDirError(
                "checkpoint '{path}' holds objects fxdrop never writes{which}: it {foreign}",
                path=path,
                which=_globals_in(path),
                foreign=foreign,
            ) from exc
        except Exception as exc:  # a truncated or foreign file; torch raises several types
            raise RunDirError(
                "checkpoint '{path}' cannot be read ({error}); use {overwrite}",
                path=path,
                error=type(exc).__name__,
                overwrite=_OVERWRITE,
            ) from exc
        # version 1 (no marker) is recognised by the policy state every fxdrop checkpoint holds
        ours = isinstance(ck, dict) and (
            ck.get("format") == CHECKPOINT_FORMAT or "format" not in ck and "policy" in ck
        )
        if not ours:
            raise RunDirError(
                "checkpoint '{path}' is not an fxdrop checkpoint: it {foreign}", path=path, foreign=foreign
            )
        version = ck.get("version", 1)
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise RunDirError(
                f"checkpoint '{path}' has format version {version!r}, newer than this fxdrop reads "
                f"({CHECKPOINT_VERSION}); upgrade fxdrop to resume it"
            )
        return ck

    def write_samples(self, keys: dict[str, torch.Tensor]) -> None:
        """The sample keys a run trained and validated on (an update compares its data with them)."""
        save_safetensors(
            {split: k.contiguous() for split, k in keys.items()},
            self.path / "samples.safetensors",
            metadata={"format": "pt"},
        )

    def read_samples(self) -> dict[str, torch.Tensor] | None:
        path = self.path / "samples.safetensors"
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise RunDirError(
                f"'{path}' cannot be read ({type(exc).__name__}); remove it to treat every image as new"
            ) from exc

    @classmethod
    def finished(cls, path: str | Path, lock: bool = True) -> "RunDir":
        """The folder of a finished run, locked (unless `lock` is False: read only), for an
        update. Refuses anything else."""
        path = Path(path)
        if not (path / "metrics.json").is_file():
            what = "has no finished fxdrop run (no metrics.json)" if path.is_dir() else "does not exist"
            raise RunDirError(
                "'{path}' {what}; run {finetune} into it first, or resume its run to the end",
                path=path,
                what=what,
                finetune=Entry("finetune"),
            )
        run = cls.__new__(cls)
        run.path, run.resuming = path, False
        run._lock = FolderLock(path, "run folder") if lock else None
        try:
            if not _is_run_config(run.read_json("config.json")):
                raise RunDirError(
                    f"'{path / 'config.json'}' is missing or was not written by fxdrop; "
                    "an update needs the run's own folder"
                )
            if lock:
                run._remove_temporaries()
        except BaseException:
            run.release()
            raise
        return run
