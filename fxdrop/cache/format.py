"""The activation cache's on-disk format: one folder of safetensors shards + a manifest per split.

    manifest.json            format, version, fingerprint, dtype and scheme (codecs.py), shape,
                             counts, per-shard sha256 and size, keys of samples that left
                             (manifest.py, with the checks a folder passes before it is reused)
    shard-00000.safetensors  x (n, *shape) as stored, scale/shift (n, groups) when quantized,
                             y (n,), key (n,), view (n,) (shards.py)

Samples are stored under their key (a 64-bit hash of what the sample is: its file path and
content), not their position, so new samples are appended as new shards and samples that left are
only listed as removed, until they outnumber the live ones and the cache is compacted. Within
each view, the rows are the view's shards in file order, and every view holds the same samples in
the same rows.

Shards are written under temporary names and renamed; the manifest is written last, so a folder
without a valid manifest is an unfinished build and is rebuilt. A manifest whose fingerprint or
shard hashes don't match, or that cannot be parsed, is rebuilt too, never trusted. A folder
holding files that are not fxdrop's is never deleted: it is an error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from .._io import atomic_path, write_json
from ..errors import CacheError
from ..messages import Param
from .arrays import Arrays, read_rows
from .codecs import CODECS, Codec, codec
from .manifest import (
    Invalid,
    check_folder,
    checked_manifest,
    is_ours,
    new_manifest,
    read_manifest,
    shards_rows,
)
from .shards import read_tensors, write_shard

__all__ = ["DTYPES", "Block", "ActivationCache", "shard_bytes_for"]

DTYPES = tuple(CODECS)  # the formats a cache can be stored in
_SHARD_BYTES = 256 * 2**20  # shard size: large enough for fast sequential reads, small enough to hash

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # (x (n, *shape) float, y (n,), key (n,), view)
# (stored parts {"x": (n, *shape), "scale": (n, G), ...}, y (n,), key (n,), view)
Encoded = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int]


def shard_bytes_for(cache_memory: int | None) -> int | None:
    """Shard size under a memory budget: a build holds a few shards, so an eighth of it."""
    return None if cache_memory is None else max(2**20, min(_SHARD_BYTES, cache_memory // 8))


class ActivationCache:
    """One split's cache folder. Use :meth:`open` to reuse a valid one, :meth:`write` to build."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def codec(self) -> Codec:
        return codec(self.manifest["dtype"])

    @property
    def nbytes(self) -> int:
        return sum((self.root / s["file"]).stat().st_size for s in self.manifest["shards"])

    @property
    def stored_rows(self) -> int:
        """Rows per view in the shards (removed samples included)."""
        return shards_rows(self.manifest["shards"])

    # the folder checks (manifest.py), for callers that hold the class
    read_manifest = staticmethod(read_manifest)
    check_folder = staticmethod(check_folder)

    @classmethod
    def open(cls, root: str | Path, fingerprint: str, verify: bool = True) -> "ActivationCache | None":
        """The cache at `root` if it was built for `fingerprint` in a format this version reads and
        its shards are intact, else None (:meth:`find` says why)."""
        return cls.find(root, fingerprint, verify)[0]

    @classmethod
    def find(
        cls, root: str | Path, fingerprint: str, verify: bool = True
    ) -> tuple["ActivationCache | None", "Invalid | None"]:
        """`(cache, None)` for a valid cache at `root` (see :meth:`open`); `(None, why)` when fxdrop
        files there fail a check (they are to be rebuilt); `(None, None)` when nothing is there.
        Shards no manifest lists (an append or a compaction that was killed) are deleted."""
        root = Path(root)
        check_folder(root)
        m, invalid = checked_manifest(root, fingerprint, verify)
        if m is None:
            return None, invalid
        listed = {s["file"] for s in m["shards"]}
        for f in root.iterdir():
            if f.name.startswith(("shard-", ".shard-")) and f.name not in listed:
                f.unlink(missing_ok=True)
        return cls(root, m), None

    @classmethod
    def write(
        cls,
        root: str | Path,
        fingerprint: str,
        blocks: Iterable[Block],
        dtype: str | torch.dtype,
        info: dict | None = None,
        keep: bool = True,
        shard_bytes: int | None = None,
    ) -> tuple["ActivationCache", Arrays | None]:
        """Write the blocks `(x, y, key, view)` as a new cache in format `dtype` (fp32, bf16, fp16,
        int8, fp8, or a float dtype) and return it and, with `keep`, its arrays.

        Blocks must come view by view, each view with the same samples in the same order. They are
        encoded and streamed to shards of at most `shard_bytes` as they come: a build holds a few
        shards, never the cache. The arrays, when asked for, are read back afterwards.
        """
        root, c = Path(root), codec(dtype)
        check_folder(root)
        cls.remove_files(root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            shards = _write_shards(root, _encoded(blocks, c), first=0, shard_bytes=shard_bytes)
        except BaseException:
            cls.remove_files(root)
            raise
        manifest = new_manifest(fingerprint, c, shards) | (info or {})
        write_json(root / "manifest.json", manifest)
        cache = cls(root, manifest)
        return cache, cache.load() if keep else None

    def append(self, blocks: Iterable[Block], shard_bytes: int | None = None) -> int:
        """Add samples (blocks as for :meth:`write`, every view) as new shards in the cache's
        format; nothing written before is touched. Returns how many samples were added."""
        shards = _write_shards(
            self.root, _encoded(blocks, self.codec), first=self._next_shard(), shard_bytes=shard_bytes
        )
        if [list(s["shape"]) for s in shards[:1]] != [self.manifest["shape"]] or {
            s["view"] for s in shards
        } != set(range(self.manifest["views"])):
            raise CacheError(f"samples appended to '{self.root}' do not match its shape or views")
        added = shards_rows(shards)
        self.manifest = self.manifest | {
            "shards": self.manifest["shards"] + shards,
            "num_samples": self.manifest["num_samples"] + added,
        }
        write_json(self.root / "manifest.json", self.manifest)
        return added

    def _next_shard(self) -> int:
        return 1 + max(int(s["file"][len("shard-") : -len(".safetensors")]) for s in self.manifest["shards"])

    def stored_keys(self) -> torch.Tensor:
        """`(R,)` int64: the key of every stored row, in row order (removed samples included)."""
        keys = []
        for shard in self.manifest["shards"]:
            if shard["view"] == 0:
                keys.append(read_tensors(self.root / shard["file"], ["key"])["key"])
        return torch.cat(keys)

    def live_keys(self) -> set[int]:
        """Keys of the samples held (stored and not removed)."""
        return set(self.stored_keys().tolist()) - set(self.manifest["removed"])

    def forget(self, keys: Iterable[int]) -> int:
        """Mark samples as removed (their rows stay in the shards until a compaction).
        Returns how many of `keys` were held."""
        gone = sorted(self.live_keys() & set(keys))
        if gone:
            self.manifest = self.manifest | {
                "removed": sorted(set(self.manifest["removed"]) | set(gone)),
                "num_samples": self.manifest["num_samples"] - len(gone),
            }
            write_json(self.root / "manifest.json", self.manifest)
        return len(gone)

    def needs_compaction(self) -> bool:
        """Removed rows outnumber live ones."""
        return len(self.manifest["removed"]) > self.manifest["num_samples"]

    def compact(self, shard_bytes: int | None = None) -> int:
        """Rewrite the cache with its live rows only (as stored: nothing is decoded or quantized
        again) and return the bytes reclaimed.

        The new shards get new names and the manifest listing them replaces the old one in one
        rename, then the old shards are deleted: a kill at any point leaves one valid cache, the
        old one or the new, and :meth:`open` deletes the shards the manifest does not list."""
        before = self.nbytes
        removed = torch.tensor(sorted(self.manifest["removed"]), dtype=torch.long)
        old = self.manifest["shards"]

        def live_blocks() -> Iterable[Encoded]:
            for shard in old:
                t = read_tensors(self.root / shard["file"])
                live = ~torch.isin(t["key"], removed)
                if live.any():
                    parts = {k: v[live] for k, v in t.items() if k not in ("y", "key", "view")}
                    yield parts, t["y"][live], t["key"][live], shard["view"]

        if self.manifest["num_samples"] == 0:
            raise CacheError(f"cache '{self.root}' holds no live samples to compact; delete the folder")
        shards = _write_shards(self.root, live_blocks(), first=self._next_shard(), shard_bytes=shard_bytes)
        self.manifest = self.manifest | {"shards": shards, "removed": [], "num_samples": shards_rows(shards)}
        write_json(self.root / "manifest.json", self.manifest)
        for shard in old:
            (self.root / shard["file"]).unlink(missing_ok=True)
        return before - self.nbytes

    def rows_of(self, keys: torch.Tensor) -> torch.Tensor:
        """`(N,)` the row holding each of `keys`; every key must be held."""
        stored = self.stored_keys()
        order = torch.argsort(stored)
        at = torch.searchsorted(stored[order], keys).clamp(max=len(stored) - 1)
        rows = order[at]
        if not torch.equal(stored[rows], keys):
            raise CacheError(
                f"cache '{self.root}' lacks samples it was asked for; delete the folder to rebuild it"
            )
        return rows

    def load(self, rows: torch.Tensor | None = None, pin: bool = False) -> Arrays:
        """Read the stored rows `rows` (default: every one, in stored order) of every view into host
        memory (pinned with `pin`), as stored. Each shard is read into its place in arrays
        allocated once: the peak is the arrays plus one shard."""
        return read_rows(self.root, self.manifest, rows, pin)

    @staticmethod
    def remove_files(root: Path) -> None:
        """Delete fxdrop's files in `root` (shards, manifest, leftovers of interrupted writes),
        then `root` itself if that left it empty."""
        if not root.exists():
            return
        for f in root.iterdir():
            if is_ours(f.name):
                f.unlink(missing_ok=True)  # another process may have removed it already
        if not any(root.iterdir()):
            root.rmdir()


class _ShardWriter:
    """Writes and hashes shards on a background thread while the caller computes the next blocks;
    `close()` waits for it and re-raises its first error in the caller's thread. A shard is given
    as its blocks' tensors and streamed to the file block by block (`write_shard`), never joined
    into one tensor or one serialised buffer: a build holds the blocks of about three shards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: list[dict] = []
        self.errors: list[BaseException] = []
        self._q: queue.Queue = queue.Queue(maxsize=1)  # bounds the shards held at once
        self._thread = threading.Thread(target=self._run, name="fxdrop-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self.errors:
                continue
            name, record, tensors = item
            del item
            try:
                with atomic_path(self.root / name) as tmp:
                    digest = write_shard(tmp, tensors)
                    size = tmp.stat().st_size
                self.written.append(record | {"sha256": digest, "bytes": size})
            except BaseException as exc:  # re-raised in the caller's thread
                self.errors.append(exc)
            del tensors

    def put(self, name: str, tensors: dict[str, list[torch.Tensor]]) -> None:
        """Queue shard `name`: per tensor name, the blocks' parts, in row order."""
        record = {
            "file": name,
            "count": sum(len(t) for t in tensors["y"]),
            "view": int(tensors["view"][0][0]),
            "shape": list(tensors["x"][0].shape[1:]),
        }
        self._q.put((name, record, tensors))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


def _encoded(blocks: Iterable[Block], c: Codec) -> Iterable[Encoded]:
    for x, y, key, view in blocks:
        yield c.encode(x), y, key, view


def _write_shards(
    root: Path, blocks: Iterable[Encoded], first: int, shard_bytes: int | None = None
) -> list[dict]:
    """Write encoded blocks as shards numbered from `first` (a shard holds one view, at most
    `shard_bytes`, default `_SHARD_BYTES`), while the caller computes the next blocks; on failure
    remove what this call wrote. Returns the shard records in file order."""
    limit = min(shard_bytes or _SHARD_BYTES, _SHARD_BYTES)
    writer = _ShardWriter(root)
    pending: list[Encoded] = []
    n = first
    try:
        for parts, y, key, view in blocks:
            parts = {k: v.detach().cpu() for k, v in parts.items()}
            if pending and (pending[-1][3] != view or _nbytes(pending) >= limit):
                writer.put(f"shard-{n:05d}.safetensors", _shard(pending))
                pending, n = [], n + 1
            pending.append((parts, y, key, view))
            if writer.errors:
                break
        if pending and not writer.errors:
            writer.put(f"shard-{n:05d}.safetensors", _shard(pending))
        del pending
    finally:
        writer.close()
    if writer.errors:
        for s in writer.written:
            (root / s["file"]).unlink(missing_ok=True)
        exc = writer.errors[0]
        raise CacheError(
            "writing cache shards to '{root}' failed ({error}); free disk space or choose another {cache_dir}",
            root=root,
            error=f"{type(exc).__name__}: {exc}",
            cache_dir=Param("cache_dir"),
        ) from exc
    if not writer.written:
        raise CacheError(f"no samples to cache in '{root}'")
    return sorted(writer.written, key=lambda s: s["file"])


def _nbytes(blocks: list[Encoded]) -> int:
    return sum(t.numel() * t.element_size() for b in blocks for t in b[0].values())


def _shard(blocks: list[Encoded]) -> dict[str, list[torch.Tensor]]:
    """A shard's tensors as the blocks' parts (joined only in the file)."""
    return {k: [b[0][k] for b in blocks] for k in blocks[0][0]} | {
        "y": [b[1].cpu().long() for b in blocks],
        "key": [b[2].cpu().long() for b in blocks],
        "view": [torch.full((len(b[1]),), b[3], dtype=torch.long) for b in blocks],
    }
