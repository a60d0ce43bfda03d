"""The activation cache's on-disk format: one folder of safetensors shards + a manifest per split.

    manifest.json            format, version, fingerprint, dtype and scheme (codecs.py), shape,
                             counts, per-shard sha256, keys of samples that left
    shard-00000.safetensors  x (n, *shape) as stored, scale/shift (n, groups) when quantized,
                             y (n,), key (n,), view (n,)

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

import hashlib
import json
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_path, sha256_file, write_json
from ..errors import CacheError
from .codecs import CODECS, Codec, codec

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DTYPES",
    "Arrays",
    "ActivationCache",
    "Invalid",
    "fingerprint_of",
    "tensors_hash",
    "is_ours",
]

CACHE_FORMAT = "fxdrop-activation-cache"
# 3: formats (int8, fp8 with their parameters); 2: samples under keys; older: rebuilt, never read
CACHE_VERSION = 3
DTYPES = tuple(CODECS)  # the formats a cache can be stored in
_SHARD_BYTES = 256 * 2**20  # shard size: large enough for fast sequential reads, small enough to hash

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # (x (n, *shape) float, y (n,), key (n,), view)
# (stored parts {"x": (n, *shape), "scale": (n, G), ...}, y (n,), key (n,), view)
Encoded = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int]


def shard_bytes_for(cache_memory: int | None) -> int | None:
    """Shard size under a memory budget: a build holds a few shards, so an eighth of it."""
    return None if cache_memory is None else max(2**20, min(_SHARD_BYTES, cache_memory // 8))


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
    """A split's stored activations in memory, as stored (decoded batch by batch)."""

    x: torch.Tensor  # (V, N, *shape) stored values; V = views
    y: torch.Tensor  # (N,) labels
    key: torch.Tensor  # (N,) int64 sample keys
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # (V, N, G) per quantization group
    codec: Codec = CODECS["fp32"]

    def to(self, device: torch.device) -> "Arrays":
        return Arrays(
            self.x.to(device),
            self.y.to(device),
            self.key.to(device),
            {k: p.to(device) for k, p in self.params.items()},
            self.codec,
        )

    def gather(
        self, view: int, sel: torch.Tensor, device: torch.device, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float activations of samples `sel` of `view` on `device`: the stored parts are
        gathered, moved, then decoded there. `x`: the gathered stored values, if done already."""
        x = self.x[view].index_select(0, sel) if x is None else x
        parts = {"x": x.to(device, non_blocking=True)}
        parts |= {
            k: p[view].index_select(0, sel).to(device, non_blocking=True) for k, p in self.params.items()
        }
        return self.codec.decode(parts)

    def decoded(self, view: int) -> torch.Tensor:
        """`(N, *shape)` float32: every sample of one view."""
        return self.gather(view, torch.arange(len(self.y), device=self.x.device), self.x.device)


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

    @staticmethod
    def read_manifest(root: Path) -> dict | None:
        """The folder's manifest, or None when it is missing, truncated or not fxdrop's format."""
        try:
            m = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):  # missing, unreadable or damaged: an unfinished build
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
        cls.check_folder(root)
        m = cls.read_manifest(root)
        if m is None:
            return None, _manifest_problem(root)
        invalid = _manifest_mismatch(m, fingerprint) or _shards_problem(root, m["shards"], verify)
        if invalid is not None:
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
        cls.check_folder(root)
        cls.remove_files(root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            shards = _write_shards(root, _encoded(blocks, c), first=0, shard_bytes=shard_bytes)
        except BaseException:
            cls.remove_files(root)
            raise
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "dtype": c.name,
            "scheme": c.tag(),
            "shape": list(shards[0]["shape"]),
            "num_samples": shards_rows(shards),
            "views": len({s["view"] for s in shards}),
            "removed": [],
            "shards": shards,
        } | (info or {})
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
        stored = self.stored_rows
        rows = torch.arange(stored) if rows is None else rows
        slot = torch.full((stored,), -1, dtype=torch.long)  # (R,) where each stored row goes; -1: not read
        slot[rows] = torch.arange(len(rows))
        m, views = self.manifest, self.manifest["views"]
        x = params = None
        y, key = torch.empty(len(rows), dtype=torch.long), torch.empty(len(rows), dtype=torch.long)
        start = dict.fromkeys(range(views), 0)
        for shard in m["shards"]:
            v, n = shard["view"], shard["count"]
            to = slot[start[v] : start[v] + n]
            start[v] += n
            take = to >= 0
            if not take.any():
                continue
            t = read_tensors(self.root / shard["file"])
            if take.all():  # no boolean-indexed copy of a whole shard
                take = slice(None)
            if x is None:
                x = torch.empty((views, len(rows), *t["x"].shape[1:]), dtype=t["x"].dtype, pin_memory=pin)
                params = {
                    k: torch.empty((views, len(rows), *t[k].shape[1:]), dtype=t[k].dtype)
                    for k in self.codec.params
                }
            x[v].index_copy_(0, to[take], t["x"][take])
            for k in params:
                params[k][v].index_copy_(0, to[take], t[k][take])
            if v == 0:
                y.index_copy_(0, to[take], t["y"][take])
                key.index_copy_(0, to[take], t["key"][take])
        if x is None:
            raise CacheError(
                f"cache '{self.root}' holds none of the samples asked for; delete the folder to rebuild it"
            )
        return Arrays(x, y, key, params, self.codec)

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


@dataclass(frozen=True)
class Invalid:
    """Why the files in a cache folder were not reused: the check that failed and on which file."""

    check: str  # manifest | version | format | fingerprint | missing | size | sha256
    file: str  # manifest.json or the shard that failed
    detail: str  # what was found, in words

    def describe(self) -> str:
        return f"{self.file} failed its {self.check} check ({self.detail})"


def _manifest_problem(root: Path) -> Invalid | None:
    """Why a folder without a readable manifest is rebuilt; None when it holds nothing of a cache."""
    path = root / "manifest.json"
    if path.exists():
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return Invalid("manifest", path.name, f"unreadable: {type(exc).__name__}")
        return Invalid("manifest", path.name, "not an fxdrop activation cache manifest")
    if root.is_dir() and any(f.name.startswith("shard-") for f in root.iterdir()):
        return Invalid("manifest", path.name, "missing: a build that did not finish")
    return None


def _manifest_mismatch(m: dict, fingerprint: str) -> Invalid | None:
    """Why a readable manifest does not describe the cache asked for."""
    if m.get("version") != CACHE_VERSION:
        return Invalid(
            "version",
            "manifest.json",
            f"format version {m.get('version')}, this fxdrop reads {CACHE_VERSION}",
        )
    if m.get("dtype") not in CODECS or m.get("scheme") != codec(m["dtype"]).tag():
        # stored bytes whose meaning this version does not know are never decoded
        return Invalid(
            "format",
            "manifest.json",
            f"storage format {m.get('dtype')!r} / {m.get('scheme')!r} is unknown here",
        )
    if m.get("fingerprint") != fingerprint:
        return Invalid(
            "fingerprint", "manifest.json", "made for another prefix, weights, cut, format or data"
        )
    return None


def _shards_problem(root: Path, shards: list[dict], verify: bool) -> Invalid | None:
    """The first shard that is missing, of another size than recorded, or (with `verify`) whose
    bytes do not hash to the recorded sha256."""
    for shard in shards:
        path = root / shard["file"]
        if not path.is_file():
            return Invalid("missing", shard["file"], "listed in the manifest, not on disk")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:  # caches before the size was recorded: sha256 only
            return Invalid("size", shard["file"], f"{size} bytes, the manifest says {shard['bytes']}")
        if verify and sha256_file(path) != shard["sha256"]:
            return Invalid("sha256", shard["file"], "its bytes changed: sha256 mismatch")
    return None


_ST_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I64": torch.int64,
}


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_shard(path: Path, tensors: dict[str, list[torch.Tensor]]) -> str:
    """Write a safetensors file whose tensor `name` is the rows of `tensors[name]` joined, streaming
    each part's bytes (no joined copy), and return the file's sha256."""
    header, offset = {}, 0
    for name, parts in tensors.items():
        nbytes = sum(t.numel() * t.element_size() for t in parts)
        header[name] = {
            "dtype": _ST_NAMES[parts[0].dtype],
            "shape": [sum(len(t) for t in parts), *parts[0].shape[1:]],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for parts in tensors.values():
            for t in parts:
                if t.numel():
                    raw = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                    f.write(raw)
                    digest.update(raw)
    return digest.hexdigest()


def read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors `names` (default: all) of a shard, read with plain reads of just their bytes.

    reason: tensors from safetensors' memory-mapped `safe_open` keep the file mapped while they
    live, so holding the keys of every shard (`stored_keys`) kept every shard's pages resident;
    tensors read here own their memory."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        out = {}
        for name in names if names is not None else header:
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(8 + size + begin)
            data = bytearray(end - begin)
            f.readinto(data)
            dtype = _ST_DTYPES[info["dtype"]]
            out[name] = (
                torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            ).reshape(info["shape"])
    return out


def shards_rows(shards: list[dict]) -> int:
    """Rows per view of a list of shard records."""
    return sum(s["count"] for s in shards if s["view"] == 0)


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
            f"writing cache shards to '{root}' failed ({type(exc).__name__}: {exc}); "
            "free disk space or choose another `cache_dir`"
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
