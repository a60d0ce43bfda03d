"""The activation cache's on-disk format: one folder of safetensors shards + a manifest per split.

    manifest.json            format, version, fingerprint, dtype, shape, counts, per-shard sha256,
                             keys of samples that left
    shard-00000.safetensors  x (n, *shape), y (n,), key (n,), view (n,)

Samples are stored under their key (a 64-bit hash of what the sample is: its file path and
content), not their position, so new samples are appended as new shards and samples that left are
only listed as removed: what is valid is never rewritten. Within each view, the rows are the
view's shards in file order, and every view holds the same samples in the same rows.

Shards are written under temporary names and renamed; the manifest is written last, so a folder
without a valid manifest is an unfinished build and is rebuilt. A manifest whose fingerprint or
shard hashes don't match, or that cannot be parsed, is rebuilt too, never trusted. A folder
holding files that are not fxdrop's is never deleted: it is an error.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from .._io import atomic_path, sha256_file, write_json
from ..errors import CacheError

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "DTYPES", "Arrays", "ActivationCache", "fingerprint_of", "tensors_hash", "is_ours"]

CACHE_FORMAT = "fxdrop-activation-cache"
CACHE_VERSION = 2  # 2: samples stored under keys (1: by position; rebuilt, never read)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHARD_BYTES = 256 * 2**20  # shard size: large enough for fast sequential reads, small enough to hash

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # (x (n, *shape), y (n,), key (n,), view)


def is_ours(name: str) -> bool:
    """A file name fxdrop writes in a cache folder (shards, manifest, interrupted temporaries)."""
    return name == "manifest.json" or name.startswith(("shard-", ".shard-", ".manifest.json."))


def foreign_file_error(root: Path, name: str) -> CacheError:
    return CacheError(
        f"cache folder '{root}' holds '{name}', which fxdrop did not write; "
        "point `cache_dir` at an empty or fxdrop-made folder"
    )


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


@dataclass
class Arrays:
    """A split's activations in memory."""

    x: torch.Tensor  # (V, N, *shape) activations, cache dtype; V = views
    y: torch.Tensor  # (N,) labels
    key: torch.Tensor  # (N,) int64 sample keys

    def rows(self, rows: torch.Tensor) -> "Arrays":
        return Arrays(self.x.index_select(1, rows), self.y.index_select(0, rows), self.key.index_select(0, rows))


class _ShardWriter:
    """Serialises and writes shards on a background thread while the caller computes the next
    blocks; `close()` waits for it and re-raises its first error in the caller's thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: list[dict] = []
        self.errors: list[BaseException] = []
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="fxdrop-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self.errors:
                continue
            name, tensors = item
            try:
                payload = save(tensors)
                with atomic_path(self.root / name) as tmp:
                    tmp.write_bytes(payload)
                self.written.append({"file": name, "sha256": hashlib.sha256(payload).hexdigest(),
                                     "count": len(tensors["y"]), "view": int(tensors["view"][0]),
                                     "shape": list(tensors["x"].shape[1:])})
            except BaseException as exc:  # reason: re-raised in the caller's thread
                self.errors.append(exc)

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self._q.put((name, tensors))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


class ActivationCache:
    """One split's cache folder. Use :meth:`open` to reuse a valid one, :meth:`write` to build."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def nbytes(self) -> int:
        return sum((self.root / s["file"]).stat().st_size for s in self.manifest["shards"])

    @staticmethod
    def read_manifest(root: Path) -> dict | None:
        """The folder's manifest, or None when it is missing, truncated or not fxdrop's format."""
        try:
            m = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):  # reason: missing, unreadable or damaged: an unfinished build
            return None
        return m if isinstance(m, dict) and m.get("format") == CACHE_FORMAT else None

    @staticmethod
    def check_folder(root: Path) -> None:
        """Refuse a folder with files fxdrop did not write (they would be deleted on rebuild)."""
        if not root.exists():
            return
        if not root.is_dir():
            raise CacheError(f"cache path '{root}' is a file, not a folder; choose another `cache_dir`")
        for f in root.iterdir():
            if not is_ours(f.name):
                raise foreign_file_error(root, f.name)

    @classmethod
    def open(cls, root: str | Path, fingerprint: str, verify: bool = True) -> "ActivationCache | None":
        """The cache at `root` if it was built for `fingerprint` and its shards are intact, else None."""
        root = Path(root)
        cls.check_folder(root)
        m = cls.read_manifest(root)
        if m is None or m.get("version") != CACHE_VERSION or m.get("fingerprint") != fingerprint:
            return None
        for shard in m["shards"]:
            path = root / shard["file"]
            if not path.is_file() or (verify and sha256_file(path) != shard["sha256"]):
                return None
        listed = {s["file"] for s in m["shards"]}
        for f in root.iterdir():
            if f.name.startswith(("shard-", ".shard-")) and f.name not in listed:
                f.unlink(missing_ok=True)  # reason: an append that was killed before its manifest
        return cls(root, m)

    @classmethod
    def write(
        cls, root: str | Path, fingerprint: str, blocks: Iterable[Block], dtype: torch.dtype,
        info: dict | None = None, keep: bool = True,
    ) -> tuple["ActivationCache", Arrays | None]:
        """Write the blocks `(x, y, key, view)` as a new cache and return it and its arrays.

        Blocks must come view by view, each view with the same samples in the same order. With
        `keep=False` (the disk tier) nothing is kept in memory and the arrays returned are None.
        """
        root = Path(root)
        cls.check_folder(root)
        cls.remove_files(root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            shards, arrays = _write_shards(root, blocks, dtype, keep, first=0)
        except BaseException:
            cls.remove_files(root)
            raise
        x_shape = arrays.x.shape[2:] if arrays is not None else None
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint,
            "dtype": str(dtype).replace("torch.", ""), "shape": list(x_shape or shards[0]["shape"]),
            "num_samples": shards_rows(shards), "views": len({s["view"] for s in shards}), "removed": [],
            "shards": shards,
        } | (info or {})
        write_json(root / "manifest.json", manifest)
        return cls(root, manifest), arrays

    def append(self, blocks: Iterable[Block]) -> int:
        """Add samples (blocks as for :meth:`write`, every view) as new shards; nothing written
        before is touched. Returns how many samples were added."""
        dtype = DTYPES[{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.manifest["dtype"]]]
        first = 1 + max(int(s["file"][len("shard-"):-len(".safetensors")]) for s in self.manifest["shards"])
        shards, _ = _write_shards(self.root, blocks, dtype, keep=False, first=first)
        if [list(s["shape"]) for s in shards[:1]] != [self.manifest["shape"]] or \
                {s["view"] for s in shards} != set(range(self.manifest["views"])):
            raise CacheError(f"samples appended to '{self.root}' do not match its shape or views")
        added = shards_rows(shards)
        self.manifest = self.manifest | {"shards": self.manifest["shards"] + shards,
                                         "num_samples": self.manifest["num_samples"] + added}
        write_json(self.root / "manifest.json", self.manifest)
        return added

    def stored_keys(self) -> torch.Tensor:
        """`(R,)` int64: the key of every stored row, in row order (removed samples included)."""
        keys = []
        for shard in self.manifest["shards"]:
            if shard["view"] == 0:
                with safe_open(str(self.root / shard["file"]), framework="pt") as st:
                    keys.append(st.get_tensor("key"))
        return torch.cat(keys)

    def live_keys(self) -> set[int]:
        """Keys of the samples held (stored and not removed)."""
        return set(self.stored_keys().tolist()) - set(self.manifest["removed"])

    def forget(self, keys: Iterable[int]) -> int:
        """Mark samples as removed (their rows stay in the shards until the cache is rebuilt).
        Returns how many of `keys` were held."""
        gone = sorted(self.live_keys() & set(keys))
        if gone:
            self.manifest = self.manifest | {"removed": sorted(set(self.manifest["removed"]) | set(gone)),
                                             "num_samples": self.manifest["num_samples"] - len(gone)}
            write_json(self.root / "manifest.json", self.manifest)
        return len(gone)

    def rows_of(self, keys: torch.Tensor) -> torch.Tensor:
        """`(N,)` the row holding each of `keys`; every key must be held."""
        stored = self.stored_keys()
        order = torch.argsort(stored)
        at = torch.searchsorted(stored[order], keys).clamp(max=len(stored) - 1)
        rows = order[at]
        if not torch.equal(stored[rows], keys):
            raise CacheError(f"cache '{self.root}' lacks samples it was asked for; delete the folder to rebuild it")
        return rows

    def load(self) -> Arrays:
        """Read every shard into host memory (every stored row)."""
        xs: dict[int, list[torch.Tensor]] = {}
        ys, keys = [], []
        for shard in self.manifest["shards"]:
            t = load((self.root / shard["file"]).read_bytes())
            v = int(t["view"][0])
            xs.setdefault(v, []).append(t["x"])
            if v == 0:
                ys.append(t["y"])
                keys.append(t["key"])
        return Arrays(torch.stack([torch.cat(xs[v]) for v in sorted(xs)]), torch.cat(ys), torch.cat(keys))

    @staticmethod
    def remove_files(root: Path) -> None:
        """Delete fxdrop's files in `root` (shards, manifest, leftovers of interrupted writes),
        then `root` itself if that left it empty."""
        if not root.exists():
            return
        for f in root.iterdir():
            if is_ours(f.name):
                f.unlink(missing_ok=True)  # reason: another process may have removed it already
        if not any(root.iterdir()):
            root.rmdir()


def shards_rows(shards: list[dict]) -> int:
    """Rows per view of a list of shard records."""
    return sum(s["count"] for s in shards if s["view"] == 0)


def _write_shards(root: Path, blocks: Iterable[Block], dtype: torch.dtype, keep: bool,
                  first: int) -> tuple[list[dict], Arrays | None]:
    """Write blocks as shards numbered from `first` (a shard holds one view); on failure remove
    what this call wrote. Returns the shard records in file order and, with `keep`, the arrays."""
    writer = _ShardWriter(root)
    xs: dict[int, list[torch.Tensor]] = {}
    ys: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    pending: list[Block] = []
    n = first
    try:
        for x, y, key, view in blocks:
            x = x.detach().to(dtype)
            if keep:
                xs.setdefault(view, []).append(x)
            if view == 0:
                ys.append(y.cpu())
                keys.append(key.cpu())
            if pending and (pending[-1][3] != view or _nbytes(pending) >= _SHARD_BYTES):
                writer.put(f"shard-{n:05d}.safetensors", _shard(pending))
                pending, n = [], n + 1
            pending.append((x, y, key, view))
            if writer.errors:
                break
        if pending and not writer.errors:
            writer.put(f"shard-{n:05d}.safetensors", _shard(pending))
    finally:
        writer.close()
    if writer.errors:
        for s in writer.written:
            (root / s["file"]).unlink(missing_ok=True)
        exc = writer.errors[0]
        raise CacheError(f"writing cache shards to '{root}' failed ({type(exc).__name__}: {exc}); "
                         "free disk space or choose another `cache_dir`") from exc
    if not writer.written:
        raise CacheError(f"no samples to cache in '{root}'")
    shards = sorted(writer.written, key=lambda s: s["file"])
    views = sorted(xs)
    arrays = Arrays(torch.stack([torch.cat(xs[v]) for v in views]), torch.cat(ys).long(), torch.cat(keys).long()) \
        if keep else None
    return shards, arrays


def _nbytes(blocks: list[Block]) -> int:
    return sum(b[0].numel() * b[0].element_size() for b in blocks)


def _shard(blocks: list[Block]) -> dict[str, torch.Tensor]:
    return {
        "x": torch.cat([b[0] for b in blocks]).cpu().contiguous(),
        "y": torch.cat([b[1] for b in blocks]).cpu().long(),
        "key": torch.cat([b[2] for b in blocks]).cpu().long(),
        "view": torch.cat([torch.full((len(b[1]),), b[3], dtype=torch.long) for b in blocks]),
    }
