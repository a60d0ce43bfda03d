"""Activation cache: the prefix's outputs for one data split, as safetensors shards + manifest.

Folder layout (one folder per split and cut):

    manifest.json            format, version, fingerprint, dtype, shape, counts, per-shard sha256
    shard-00000.safetensors  x (n, *shape), y (n,), idx (n,), view (n,)

Shards are written under temporary names and renamed; the manifest is written last, so a folder
without a valid manifest is an unfinished build and is rebuilt. A manifest whose fingerprint or
shard hashes don't match is rebuilt too, never trusted. A folder holding files that are not
fxdrop's is never deleted: it is an error.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from concurrent.futures import ThreadPoolExecutor

from safetensors import safe_open
from safetensors.torch import load, save

from ._io import atomic_path, sha256_file, write_json
from .errors import CacheError

__all__ = ["CACHE_FORMAT", "CacheData", "DiskCacheData", "ActivationCache", "choose_tier", "fingerprint_of", "DTYPES"]

CACHE_FORMAT = "fxdrop-activation-cache"
CACHE_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHARD_BYTES = 256 * 2**20  # shard size: large enough for fast sequential reads, small enough to hash


def _is_ours(name: str) -> bool:
    """A file name fxdrop writes in a cache folder (shards, manifest, interrupted temporaries)."""
    return name == "manifest.json" or name.startswith(("shard-", ".shard-", ".manifest.json."))


def _foreign(root: Path, name: str) -> CacheError:
    return CacheError(
        f"cache folder '{root}' holds '{name}', which fxdrop did not write; "
        "point --cache-dir at an empty or fxdrop-made folder"
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
class CacheData:
    """A split's activations, resident in memory (device or host)."""

    x: torch.Tensor  # (V, N, *shape) activations, cache dtype; V = views
    y: torch.Tensor  # (N,) labels
    idx: torch.Tensor  # (N,) dataset index of each sample

    @property
    def views(self) -> int:
        return self.x.shape[0]

    def blocks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """`(x, y, idx, view)` blocks in stored order (to compute a later cut from this one)."""
        for v in range(self.views):
            for s in range(0, len(self.y), size):
                yield self.x[v, s : s + size], self.y[s : s + size], self.idx[s : s + size], v

    @property
    def tier(self) -> str:
        if self.x.device.type == "cuda":
            return "device"
        return "pinned" if self.x.is_pinned() else "memory"

    def batches(
        self, order: torch.Tensor, batch_size: int, view: int, device: torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Gather batches by tensor indexing (no Python loop over samples), onto `device`.

        Device tier: an index into the resident tensor. Pinned tier: gathered into one of two
        pinned buffers and copied asynchronously, so the next gather overlaps the copy.
        """
        xv = self.x[view % self.views]
        device = device or self.x.device
        order = order.to(self.x.device)
        if self.tier != "pinned" or device.type != "cuda":
            for start in range(0, len(order), batch_size):
                sel = order[start : start + batch_size]
                yield xv.index_select(0, sel).to(device), self.y.index_select(0, sel).to(device)
            return
        bufs = [torch.empty((batch_size, *xv.shape[1:]), dtype=xv.dtype).pin_memory() for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        for i, start in enumerate(range(0, len(order), batch_size)):
            sel = order[start : start + batch_size]
            buf = bufs[i % 2][: len(sel)]
            if done[i % 2] is not None:
                done[i % 2].synchronize()  # reason: the copy out of this buffer must have finished
            torch.index_select(xv, 0, sel, out=buf)
            x = buf.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            done[i % 2] = ev
            yield x, self.y.index_select(0, sel).to(device, non_blocking=True)


class DiskCacheData:
    """A split's activations read from memory-mapped shards, with a background read-ahead.

    Shuffling: the shard order is shuffled every epoch, and samples are shuffled within a window
    of `window` shards (not globally). The next window is read while the current one trains.
    """

    tier = "disk"

    def __init__(self, cache: "ActivationCache", window: int = 4) -> None:
        self.cache = cache
        self.window = window
        self.views = cache.manifest["views"]
        self.num_samples = cache.manifest["num_samples"]

    def blocks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """`(x, y, idx, view)` blocks in stored order, one shard at a time."""
        for shard in self.cache.manifest["shards"]:
            with safe_open(str(self.cache.root / shard["file"]), framework="pt") as st:
                x, y, idx = st.get_tensor("x"), st.get_tensor("y"), st.get_tensor("idx")
            for s in range(0, len(y), size):
                yield x[s : s + size], y[s : s + size], idx[s : s + size], shard.get("view", 0)

    def _read(self, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            with safe_open(str(self.cache.root / f), framework="pt") as st:
                xs.append(st.get_tensor("x"))
                ys.append(st.get_tensor("y"))
        return torch.cat(xs), torch.cat(ys)

    def batches(
        self, order: torch.Tensor, batch_size: int, view: int, device: torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`order` seeds the shuffle (its first element mixes into the shard order)."""
        device = device or torch.device("cpu")
        shards = [s["file"] for s in self.cache.manifest["shards"] if s.get("view", 0) == view % self.views]
        g = torch.Generator().manual_seed(int(order[0]) if len(order) else 0)
        shards = [shards[i] for i in torch.randperm(len(shards), generator=g).tolist()]
        windows = [shards[i : i + self.window] for i in range(0, len(shards), self.window)]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxdrop-readahead")
        try:
            ahead = pool.submit(self._read, windows[0]) if windows else None
            carry_x = carry_y = None
            for w in range(len(windows)):
                x, y = ahead.result()
                ahead = pool.submit(self._read, windows[w + 1]) if w + 1 < len(windows) else None
                if carry_x is not None:
                    x, y = torch.cat([carry_x, x]), torch.cat([carry_y, y])
                perm = torch.randperm(len(y), generator=g)
                full = len(y) - len(y) % batch_size if ahead is not None else len(y)
                for s in range(0, full, batch_size):
                    sel = perm[s : s + batch_size]
                    yield x.index_select(0, sel).to(device), y.index_select(0, sel).to(device)
                rest = perm[full:]
                carry_x, carry_y = x.index_select(0, rest), y.index_select(0, rest)
        finally:
            pool.shutdown(wait=True)


def choose_tier(nbytes: int, device: torch.device, host_free: int, device_free: int = 0) -> str:
    """The fastest tier the cache fits in, keeping half of the free memory for everything else."""
    if device.type == "cuda" and nbytes <= device_free // 2:
        return "device"
    if nbytes <= host_free // 2:
        return "pinned" if device.type == "cuda" else "memory"
    return "disk"


class ActivationCache:
    """One split's cache folder. Use :meth:`open` to reuse a valid one, :meth:`write` to build."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def nbytes(self) -> int:
        return sum((self.root / s["file"]).stat().st_size for s in self.manifest["shards"])

    @staticmethod
    def _read_manifest(root: Path) -> dict | None:
        path = root / "manifest.json"
        if not path.exists():
            return None
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return m if isinstance(m, dict) and m.get("format") == CACHE_FORMAT else None

    @staticmethod
    def check_folder(root: Path) -> None:
        """Refuse a folder with files fxdrop did not write (they would be deleted on rebuild)."""
        if not root.exists():
            return
        if not root.is_dir():
            raise CacheError(f"cache path '{root}' is a file, not a folder; choose another --cache-dir")
        manifest = ActivationCache._read_manifest(root)
        for f in root.iterdir():
            if not _is_ours(f.name):
                raise _foreign(root, f.name)
        if (root / "manifest.json").exists() and manifest is None:
            raise CacheError(f"'{root / 'manifest.json'}' is not an fxdrop cache manifest; use another --cache-dir")

    @staticmethod
    def check_root(root: Path) -> None:
        """Refuse a `--cache-dir` holding anything but fxdrop's `cut-*` folders."""
        if not root.exists():
            return
        if not root.is_dir():
            raise CacheError(f"--cache-dir '{root}' is a file; give a folder")
        for entry in root.iterdir():
            if not (entry.is_dir() and entry.name.startswith("cut-")):
                raise _foreign(root, entry.name)
            for split in entry.iterdir():
                ActivationCache.check_folder(split)

    @classmethod
    def open(cls, root: str | Path, fingerprint: str, verify: bool = True) -> "ActivationCache | None":
        """The cache at `root` if it was built for `fingerprint` and its shards are intact, else None."""
        root = Path(root)
        cls.check_folder(root)
        m = cls._read_manifest(root)
        if m is None or m.get("version") != CACHE_VERSION or m.get("fingerprint") != fingerprint:
            return None
        for shard in m["shards"]:
            path = root / shard["file"]
            if not path.is_file() or (verify and sha256_file(path) != shard["sha256"]):
                return None
        return cls(root, m)

    @classmethod
    def write(
        cls,
        root: str | Path,
        fingerprint: str,
        blocks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]],
        dtype: torch.dtype,
        info: dict | None = None,
        keep: bool = True,
    ) -> tuple["ActivationCache", CacheData | None]:
        """Write the blocks `(x, y, idx, view)` as shards and return the cache and its data.

        Shards are serialised and written by a background thread while the caller computes
        the next blocks. Blocks must come view by view, each view in the same sample order.
        With `keep=False` (the disk tier) nothing is kept in memory and the data returned is None.
        """
        root = Path(root)
        cls.check_folder(root)
        cls.remove_files(root)
        root.mkdir(parents=True, exist_ok=True)

        written: list[dict] = []
        errors: list[BaseException] = []
        q: queue.Queue = queue.Queue(maxsize=2)

        def writer() -> None:
            while (item := q.get()) is not None:
                if errors:
                    continue
                name, tensors = item
                try:
                    payload = save(tensors)
                    with atomic_path(root / name) as tmp:
                        tmp.write_bytes(payload)
                    written.append({"file": name, "sha256": hashlib.sha256(payload).hexdigest(),
                                    "count": len(tensors["y"]), "view": int(tensors["view"][0])})
                except BaseException as exc:  # reason: re-raised in the caller's thread
                    errors.append(exc)

        thread = threading.Thread(target=writer, name="fxdrop-cache-writer", daemon=True)
        thread.start()
        xs: dict[int, list[torch.Tensor]] = {}
        ys: list[torch.Tensor] = []
        idxs: list[torch.Tensor] = []
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        pending_bytes = 0
        n_shards = 0

        def flush() -> None:
            nonlocal pending, pending_bytes, n_shards
            if not pending:
                return
            tensors = {
                "x": torch.cat([p[0] for p in pending]).cpu().contiguous(),
                "y": torch.cat([p[1] for p in pending]).cpu().long(),
                "idx": torch.cat([p[2] for p in pending]).cpu().long(),
                "view": torch.cat([torch.full((len(p[1]),), p[3], dtype=torch.long) for p in pending]),
            }
            q.put((f"shard-{n_shards:05d}.safetensors", tensors))
            pending, pending_bytes, n_shards = [], 0, n_shards + 1

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
                if pending and pending[-1][3] != view:
                    flush()
                pending.append((x, y, idx, view))
                pending_bytes += x.numel() * x.element_size()
                if pending_bytes >= _SHARD_BYTES:
                    flush()
                if errors:
                    break
            flush()
        finally:
            q.put(None)
            thread.join()
        if errors:
            cls.remove_files(root)
            exc = errors[0]
            raise CacheError(f"writing cache shards to '{root}' failed ({type(exc).__name__}: {exc}); "
                             "free disk space or choose another --cache-dir") from exc
        if shape is None:
            raise CacheError(f"no samples to cache in '{root}'")
        written.sort(key=lambda s: s["file"])
        views = sorted({s["view"] for s in written})
        y_all = torch.cat(ys).long()
        data = CacheData(torch.stack([torch.cat(xs[v]) for v in views]), y_all, torch.cat(idxs).long()) if keep else None
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "dtype": str(dtype).replace("torch.", ""),
            "shape": list(shape),
            "num_samples": len(y_all),
            "views": len(views),
            "shards": written,
        } | (info or {})
        write_json(root / "manifest.json", manifest)
        return cls(root, manifest), data

    def load(self, device: torch.device | str = "cpu") -> CacheData:
        """Read every shard into memory on `device`."""
        xs: dict[int, list[torch.Tensor]] = {}
        ys, idxs = [], []
        for shard in self.manifest["shards"]:
            t = load((self.root / shard["file"]).read_bytes())
            v = int(t["view"][0])
            xs.setdefault(v, []).append(t["x"])
            if v == 0:
                ys.append(t["y"])
                idxs.append(t["idx"])
        x = torch.stack([torch.cat(xs[v]) for v in sorted(xs)])
        return CacheData(x.to(device), torch.cat(ys).to(device), torch.cat(idxs).to(device))

    @staticmethod
    def remove_files(root: Path) -> None:
        """Delete fxdrop's files in `root` (shards, manifest, leftovers of interrupted writes), then
        `root` and its `cut-*` parent if that left them empty."""
        if not root.exists():
            return
        for f in root.iterdir():
            if _is_ours(f.name):
                f.unlink()
        if not any(root.iterdir()):
            root.rmdir()
            if root.parent.name.startswith("cut-") and not any(root.parent.iterdir()):
                root.parent.rmdir()
