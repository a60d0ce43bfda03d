"""A run's output folder: config, checkpoint, metrics and the exported model, all written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import save_safetensors, save_torch, write_json
from .cache import ActivationCache
from .errors import RunDirError

__all__ = ["RunDir", "export_model"]

_OURS = ("config.json", "metrics.json", "model.safetensors", "checkpoint.pt")
# config keys that make two runs the same run (a resumed run may change epochs, device, workers)
_IDENTITY = ("policy", "seed", "batch_size", "optimizer", "lr", "cache", "cache_views", "cache_dtype", "model", "data")


def export_model(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's state_dict under its original names, as safetensors (shared tensors de-duplicated)."""
    state = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            state[name] = t.clone()  # reason: safetensors refuses aliased tensors; load_state_dict re-ties them
        else:
            state[name] = t
            if key is not None:
                seen[key] = name
    save_safetensors(state, path, metadata=metadata)


class RunDir:
    """The `--out` folder. Refuses a folder holding a different run unless told to resume or overwrite.

    Args:
        path: the folder.
        identity: what makes this run this run (model, data, policy, seed, ...).
        resume: continue the run found there (its identity must match).
        overwrite: delete the run found there (only fxdrop's files) and start anew.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any], resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out '{self.path}' is a file; give a folder")
        existing = self.read_json("config.json")
        has_run = existing is not None or (self.path / "checkpoint.pt").exists()
        self.resuming = False
        if has_run:
            if overwrite:
                self._remove_run()
            elif resume:
                old = (existing or {}).get("identity", {})
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                if diff:
                    raise RunDirError(
                        f"'{self.path}' holds a different run ({', '.join(diff)} differ); use another --out or --overwrite"
                    )
                self.resuming = (self.path / "checkpoint.pt").exists()
            else:
                raise RunDirError(
                    f"'{self.path}' already holds a run; pass --resume to continue it or --overwrite to replace it"
                )
        self.path.mkdir(parents=True, exist_ok=True)

    def _remove_run(self) -> None:
        for name in _OURS:
            (self.path / name).unlink(missing_ok=True)
        cache = self.path / "cache"
        if cache.is_dir():
            for sub in sorted(cache.glob("*/*")):
                ActivationCache.check_folder(sub)
                ActivationCache.remove_files(sub)
            for sub in sorted(cache.glob("*")):
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            if not any(cache.iterdir()):
                shutil.rmtree(cache)

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunDirError(f"'{path}' is not valid JSON; remove it or use --overwrite") from exc

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_torch(state, self.path / "checkpoint.pt")

    def load_checkpoint(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / "checkpoint.pt", map_location="cpu", weights_only=False)
        except Exception as exc:  # reason: a truncated or foreign file; torch raises several types
            raise RunDirError(
                f"checkpoint '{self.path / 'checkpoint.pt'}' cannot be read ({type(exc).__name__}); use --overwrite"
            ) from exc
