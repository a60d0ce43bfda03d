"""The activation cache's on-disk format: one folder of safetensors shards + a manifest per split.

    manifest.json            format, version, fingerprint, dtype, shape, counts, per-shard sha256
    shard-00000.safetensors  x (n, *shape), y (n,), idx (n,), view (n,)

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
from safetensors.torch import load, save

from .._io import atomic_path, sha256_file, write_json
from ..errors import CacheError

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "DTYPES", "Arrays", "ActivationCache", "fingerprint_of", "tensors_hash", "is_ours"]

CACHE_FORMAT = "fxdrop-activation-cache"
CACHE_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHARD_BYTES = 256 * 2**20  # shard size: large enough for fast sequential reads, small enough to hash

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # (x (n, *shape), y (n,), idx (n,), view)


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
    idx: torch.Tensor  # (N,) dataset index of each sample


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
                                     "count": len(tensors["y"]), "view": int(tensors["view"][0])})
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
        return cls(root, m)

    @classmethod
    def write(
        cls, root: str | Path, fingerprint: str, blocks: Iterable[Block], dtype: torch.dtype,
        info: dict | None = None, keep: bool = True,
    ) -> tuple["ActivationCache", Arrays | None]:
        """Write the blocks `(x, y, idx, view)` as shards and return the cache and its arrays.

        Blocks must come view by view, each view in the same sample order. With `keep=False`
        (the disk tier) nothing is kept in memory and the arrays returned are None.
        """
        root = Path(root)
        cls.check_folder(root)
        cls.remove_files(root)
        root.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(root)
        xs: dict[int, list[torch.Tensor]] = {}
        ys: list[torch.Tensor] = []
        idxs: list[torch.Tensor] = []
        pending: list[Block] = []
        n_shards = 0
        shape = None
        try:
            for x, y, idx, view in blocks:
                x = x.detach().to(dtype)
                shape = tuple(x.shape[1:])
                if keep:
                    xs.setdefault(view, []).append(x)
                if view == 0:
                    ys.append(y.cpu())
                    idxs.append(idx.cpu())
                if pending and (pending[-1][3] != view or _nbytes(pending) >= _SHARD_BYTES):
                    writer.put(f"shard-{n_shards:05d}.safetensors", _shard(pending))
                    pending, n_shards = [], n_shards + 1
                pending.append((x, y, idx, view))
                if writer.errors:
                    break
            if pending and not writer.errors:
                writer.put(f"shard-{n_shards:05d}.safetensors", _shard(pending))
        finally:
            writer.close()
        if writer.errors:
            cls.remove_files(root)
            exc = writer.errors[0]
            raise CacheError(f"writing cache shards to '{root}' failed ({type(exc).__name__}: {exc}); "
                             "free disk space or choose another `cache_dir`") from exc
        if shape is None:
            raise CacheError(f"no samples to cache in '{root}'")
        shards = sorted(writer.written, key=lambda s: s["file"])
        views = sorted({s["view"] for s in shards})
        y_all = torch.cat(ys).long()
        arrays = Arrays(torch.stack([torch.cat(xs[v]) for v in views]), y_all, torch.cat(idxs).long()) if keep else None
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint,
            "dtype": str(dtype).replace("torch.", ""), "shape": list(shape), "num_samples": len(y_all),
            "views": len(views), "shards": shards,
        } | (info or {})
        write_json(root / "manifest.json", manifest)
        return cls(root, manifest), arrays

    def load(self) -> Arrays:
        """Read every shard into host memory."""
        xs: dict[int, list[torch.Tensor]] = {}
        ys, idxs = [], []
        for shard in self.manifest["shards"]:
            t = load((self.root / shard["file"]).read_bytes())
            v = int(t["view"][0])
            xs.setdefault(v, []).append(t["x"])
            if v == 0:
                ys.append(t["y"])
                idxs.append(t["idx"])
        return Arrays(torch.stack([torch.cat(xs[v]) for v in sorted(xs)]), torch.cat(ys), torch.cat(idxs))

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


def _nbytes(blocks: list[Block]) -> int:
    return sum(b[0].numel() * b[0].element_size() for b in blocks)


def _shard(blocks: list[Block]) -> dict[str, torch.Tensor]:
    return {
        "x": torch.cat([b[0] for b in blocks]).cpu().contiguous(),
        "y": torch.cat([b[1] for b in blocks]).cpu().long(),
        "idx": torch.cat([b[2] for b in blocks]).cpu().long(),
        "view": torch.cat([torch.full((len(b[1]),), b[3], dtype=torch.long) for b in blocks]),
    }
