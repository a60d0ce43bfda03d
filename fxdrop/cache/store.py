"""The cache store: owns the cache root's folder layout, the fingerprint recipe and removal.

    <root>/cut-NNN-<node>/<split>-rank<R>of<W>/   one ActivationCache per cut, split and rank

Both the engine (build, reopen, replace at each drop) and the run folder (`overwrite` removes a
run's cache) go through here, so nothing else knows the layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .._io import FolderLock
from ..errors import CacheError
from ..messages import Param
from .codecs import codec
from .format import ActivationCache, Block
from .manifest import foreign_file_error
from .tiers import Tier, place

__all__ = [
    "CacheStore",
    "Reuse",
    "open_or_extend",
    "data_fingerprint",
    "fingerprint_of",
    "tensors_hash",
    "sample_keys",
    "keyed",
]

_CUT_PREFIX = "cut-"


def fingerprint_of(parts: dict) -> str:
    """sha256 of a JSON-able description (prefix graph, weights hash, cut, dtype, data, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensors_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and bytes of tensors (the frozen prefix's weights)."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def keyed(dataset: Dataset) -> bool:
    """Whether the dataset says what each sample is (`sample_keys()` and `recipe()`, as fxdrop's
    datasets do): then its cache keeps samples across changes to the data."""
    return callable(getattr(dataset, "sample_keys", None)) and callable(getattr(dataset, "recipe", None))


def sample_keys(dataset: Dataset) -> torch.Tensor:
    """`(N,)` int64 keys the cache stores each sample under: the dataset's own, else positions."""
    return dataset.sample_keys() if keyed(dataset) else torch.arange(len(dataset))


def data_fingerprint(dataset: Dataset) -> str:
    """What turns a dataset's samples into tensors. For a keyed dataset its `recipe()` (the keys say
    which samples); else what the samples are: its own `fingerprint()` when it has one, else its
    type, size and three samples (any change rebuilds the whole cache)."""
    if keyed(dataset):
        return "recipe:" + dataset.recipe()
    fp = getattr(dataset, "fingerprint", None)
    if callable(fp):
        return str(fp())
    n = len(dataset)
    probe = [dataset[i][0] for i in sorted({0, n // 2, n - 1})]
    probe_hash = tensors_hash((str(i), t) for i, t in enumerate(probe))
    return fingerprint_of({"type": type(dataset).__qualname__, "n": n, "probe": probe_hash})


@dataclass
class Reuse:
    """What opening a cache for a set of samples did."""

    new: int = 0  # samples computed and written
    reused: int = 0  # samples found in the cache
    removed: int = 0  # samples marked removed (they left the data)
    reclaimed: int = 0  # bytes a compaction gave back
    # caches found there but not valid, so rebuilt: {folder, check, file, detail, samples} each
    rebuilt: list[dict] = field(default_factory=list)

    def __add__(self, other: "Reuse") -> "Reuse":
        return Reuse(
            self.new + other.new,
            self.reused + other.reused,
            self.removed + other.removed,
            self.reclaimed + other.reclaimed,
            self.rebuilt + other.rebuilt,
        )


def open_or_extend(
    folder: Path,
    fingerprint: str,
    keys: torch.Tensor,
    blocks: Callable[[torch.Tensor | None], Iterable[Block]],
    dtype: str | torch.dtype,
    info: dict,
    forget_absent: torch.Tensor | None = None,
    shard_bytes: int | None = None,
) -> tuple[ActivationCache, torch.Tensor, Reuse]:
    """The cache at `folder` for the samples `keys` (`(N,)`). A valid cache for `fingerprint` is
    reused and only the samples it lacks are computed and appended; else it is written anew in
    format `dtype`. `blocks(positions)` computes the blocks of those positions of `keys` (None:
    all of them). With `forget_absent` (every key of the data), held samples not in it are marked
    removed first; when removed rows then outnumber live ones, the cache is compacted.

    Returns the cache, the stored row of each of `keys`, and what was reused (the rows are read
    back from the shards when needed: a build streams them and holds none); a cache there that
    failed a check is in `Reuse.rebuilt`."""
    found, invalid = ActivationCache.find(folder, fingerprint)
    if found is None:
        cache, _ = ActivationCache.write(
            folder, fingerprint, blocks(None), dtype, info, keep=False, shard_bytes=shard_bytes
        )
        rebuilt = [{"folder": str(folder)} | asdict(invalid) | {"samples": len(keys)}] if invalid else []
        return cache, cache.rows_of(keys), Reuse(new=len(keys), rebuilt=rebuilt)
    removed = (
        found.forget(found.live_keys() - set(forget_absent.tolist())) if forget_absent is not None else 0
    )
    reclaimed = found.compact(shard_bytes) if found.needs_compaction() else 0
    held = found.live_keys()
    missing = torch.tensor([p for p, k in enumerate(keys.tolist()) if k not in held], dtype=torch.long)
    if len(missing):
        found.append(blocks(missing), shard_bytes)
    return found, found.rows_of(keys), Reuse(len(missing), len(keys) - len(missing), removed, reclaimed)


class CacheStore:
    """The caches under `root` of one process (`rank` of `world_size`); `dtype`: the format a cache
    is written in unless a build names its own (fp32, bf16, fp16, int8, fp8, or a float dtype)."""

    def __init__(
        self,
        root: str | Path,
        dtype: str | torch.dtype = "fp32",
        rank: int = 0,
        world_size: int = 1,
        owns_root: bool | None = None,
    ) -> None:
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self.fmt = codec(dtype).name
        # a folder the user made (even empty) stays; one fxdrop made (or a run folder's
        # own `cache/`, owns_root=True) is removed once empty
        self._made_root = (not self.root.exists()) if owns_root is None else owns_root

    def folder(self, cut_index: int, cut_name: str, split: str) -> Path:
        return (
            self.root
            / f"{_CUT_PREFIX}{cut_index:03d}-{cut_name}"
            / f"{split}-rank{self.rank}of{self.world_size}"
        )

    def fingerprint(
        self,
        prefix_code: str,
        prefix_state: dict[str, torch.Tensor],
        cut_name: str,
        data: str,
        views: int,
        fmt: str | None = None,
    ) -> str:
        """Everything the cached activations depend on: the prefix's graph and weights, the cut,
        the format and its scheme, the data and its views, and this process's share of the data."""
        return fingerprint_of(
            {
                "prefix": prefix_code,
                "weights": tensors_hash(sorted(prefix_state.items())),
                "cut": cut_name,
                "format": codec(fmt or self.fmt).tag(),
                "data": data,
                "views": views,
                "rank": self.rank,
                "world": self.world_size,
            }
        )

    def check(self) -> None:
        """Refuse a root holding anything but fxdrop's cut folders (it is never cleaned)."""
        self.check_root(self.root)

    @staticmethod
    def check_root(root: Path) -> None:
        if not root.exists():
            return
        if not root.is_dir():
            raise CacheError(
                "{cache_dir} '{root}' is a file; give a folder", cache_dir=Param("cache_dir"), root=root
            )
        for entry in root.iterdir():
            if entry.name == FolderLock.NAME:
                continue
            if not (entry.is_dir() and entry.name.startswith(_CUT_PREFIX)):
                raise foreign_file_error(root, entry.name)
            for split in entry.iterdir():
                if not split.is_dir():
                    raise foreign_file_error(entry, split.name)
                ActivationCache.check_folder(split)

    def open_or_extend(
        self,
        folder: Path,
        fingerprint: str,
        keys: torch.Tensor,
        blocks: Callable[[torch.Tensor | None], Iterable[Block]],
        tier: str,
        device: torch.device,
        split: str,
        forget_absent: torch.Tensor | None = None,
        fmt: str | None = None,
        shard_bytes: int | None = None,
    ) -> tuple[ActivationCache, Tier, Reuse]:
        """:func:`open_or_extend` for this process, the result placed in `tier`."""
        info = {"split": split, "rank": self.rank, "world_size": self.world_size}
        cache, rows, reuse = open_or_extend(
            folder,
            fingerprint,
            keys,
            blocks,
            fmt or self.fmt,
            info,
            forget_absent=forget_absent,
            shard_bytes=shard_bytes,
        )
        return cache, place(cache, tier, device, rows), reuse

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
