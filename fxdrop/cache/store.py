"""The cache store: owns the cache root's folder layout, the fingerprint recipe and removal.

    <root>/cut-NNN-<node>/<split>-rank<R>of<W>/   one ActivationCache per cut, split and rank

Both the engine (build, reopen, replace at each drop) and the run folder (`overwrite` removes a
run's cache) go through here, so nothing else knows the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .._io import FolderLock
from ..errors import CacheError
from .format import ActivationCache, Block, fingerprint_of, foreign_file_error, tensors_hash
from .tiers import Tier, place

__all__ = ["CacheStore", "data_fingerprint"]

_CUT_PREFIX = "cut-"


def data_fingerprint(dataset: Dataset) -> str:
    """What a dataset's samples are: its own `fingerprint()` when it has one (fxdrop's datasets:
    file listing, transform, seed), else its type, size and three samples."""
    fp = getattr(dataset, "fingerprint", None)
    if callable(fp):
        return str(fp())
    n = len(dataset)
    probe = [dataset[i][0] for i in sorted({0, n // 2, n - 1})]
    probe_hash = tensors_hash((str(i), t) for i, t in enumerate(probe))
    return fingerprint_of({"type": type(dataset).__qualname__, "n": n, "probe": probe_hash})


class CacheStore:
    """The caches under `root` of one process (`rank` of `world_size`) in one dtype."""

    def __init__(self, root: str | Path, dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1,
                 owns_root: bool | None = None) -> None:
        self.root, self.dtype, self.rank, self.world_size = Path(root), dtype, rank, world_size
        # reason: a folder the user made (even empty) stays; one fxdrop made (or a run folder's
        # own `cache/`, owns_root=True) is removed once empty
        self._made_root = (not self.root.exists()) if owns_root is None else owns_root

    def folder(self, cut_index: int, cut_name: str, split: str) -> Path:
        return self.root / f"{_CUT_PREFIX}{cut_index:03d}-{cut_name}" / f"{split}-rank{self.rank}of{self.world_size}"

    def fingerprint(self, prefix_code: str, prefix_state: dict[str, torch.Tensor], cut_name: str,
                    data: str, views: int) -> str:
        """Everything the cached activations depend on: the prefix's graph and weights, the cut,
        the dtype, the data and its views, and this process's share of the data."""
        return fingerprint_of({
            "prefix": prefix_code, "weights": tensors_hash(sorted(prefix_state.items())), "cut": cut_name,
            "dtype": str(self.dtype), "data": data, "views": views, "rank": self.rank, "world": self.world_size,
        })

    def check(self) -> None:
        """Refuse a root holding anything but fxdrop's cut folders (it is never cleaned)."""
        self.check_root(self.root)

    @staticmethod
    def check_root(root: Path) -> None:
        if not root.exists():
            return
        if not root.is_dir():
            raise CacheError(f"`cache_dir` '{root}' is a file; give a folder")
        for entry in root.iterdir():
            if entry.name == FolderLock.NAME:
                continue
            if not (entry.is_dir() and entry.name.startswith(_CUT_PREFIX)):
                raise foreign_file_error(root, entry.name)
            for split in entry.iterdir():
                if not split.is_dir():
                    raise foreign_file_error(entry, split.name)
                ActivationCache.check_folder(split)

    def open_or_write(self, folder: Path, fingerprint: str, blocks: Callable[[], Iterable[Block]],
                      tier: str, device: torch.device, split: str) -> tuple[ActivationCache, Tier, bool]:
        """The cache at `folder` if valid for `fingerprint`, else written from `blocks()`; placed
        in `tier`. Returns it, its tier, and whether it was written."""
        found = ActivationCache.open(folder, fingerprint)
        if found is not None:
            return found, place(found, None, tier, device), False
        info = {"split": split, "rank": self.rank, "world_size": self.world_size}
        cache, arrays = ActivationCache.write(folder, fingerprint, blocks(), self.dtype, info, keep=tier != "disk")
        return cache, place(cache, arrays, tier, device), True

    def remove(self, folder: Path) -> None:
        """Delete one cache folder's files, then its cut folder and the root if left empty."""
        ActivationCache.remove_files(folder)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
        self.remove_root_if_empty()

    def lock(self) -> FolderLock:
        """Hold the root against other processes while this run uses it."""
        return FolderLock(self.root, "cache folder")

    def remove_root_if_empty(self) -> None:
        """Remove the root if fxdrop made it and no cache is left in it."""
        if not (self._made_root and self.root.is_dir()):
            return
        rest = [p for p in self.root.iterdir() if p.name != FolderLock.NAME]
        if not rest:
            (self.root / FolderLock.NAME).unlink(missing_ok=True)
            self.root.rmdir()

    def remove_all(self) -> None:
        """Delete every cache under the root (after checking it holds nothing else)."""
        self.check()
        if not self.root.is_dir():
            return
        for cut in sorted(self.root.iterdir()):
            if cut.name == FolderLock.NAME:
                continue
            for split in sorted(cut.iterdir()):
                ActivationCache.remove_files(split)
            if not any(cut.iterdir()):
                cut.rmdir()
        self.remove_root_if_empty()
