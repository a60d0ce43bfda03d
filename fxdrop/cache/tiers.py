"""Where a cache lives while training reads it: device memory, pinned host memory, host memory or
shards read from disk, behind one protocol (`Tier`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .arrays import Arrays
from .codecs import AUTO_ORDER
from .format import ActivationCache, Block
from .shards import read_tensors

__all__ = [
    "Tier",
    "MemoryTier",
    "DiskTier",
    "Placement",
    "budgets",
    "choose_tier",
    "place",
    "choose_placement",
    "host_available_bytes",
]

TIERS = ("device", "pinned", "memory", "disk")


class Tier(Protocol):
    """A split's cached activations, readable in training order and in stored order."""

    name: str  # device | pinned | memory | disk
    views: int  # augmented views per sample
    num_samples: int

    def batches(
        self, order: torch.Tensor, batch_size: int, view: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`(x, y)` batches of view `view` on `device`, in the epoch's order (`order`: positions
        of the cached samples)."""
        ...

    def blocks(self, size: int) -> Iterator[Block]:
        """`(x, y, key, view)` blocks of every sample, view by view (to compute a later cut from this one)."""
        ...


class MemoryTier:
    """Activations resident in memory, as stored: on the device (a batch is an index into it), in
    pinned host memory (gathered into pinned buffers, copied asynchronously), or in host memory.
    A batch is decoded on the device, after the copy."""

    def __init__(self, arrays: Arrays, name: str) -> None:
        self.arrays, self.name = arrays, name
        self.views, self.num_samples = arrays.x.shape[0], len(arrays.y)

    def blocks(self, size: int) -> Iterator[Block]:
        a = self.arrays
        for v in range(self.views):
            for s in range(0, self.num_samples, size):
                sel = torch.arange(s, min(s + size, self.num_samples), device=a.x.device)
                yield a.gather(v, sel, a.x.device), a.y[s : s + size], a.key[s : s + size], v

    def batches(self, order, batch_size, view, device):
        a, view = self.arrays, view % self.views
        order = order.to(a.x.device)
        if self.name != "pinned" or device.type != "cuda":
            for start in range(0, len(order), batch_size):
                sel = order[start : start + batch_size]
                yield a.gather(view, sel, device), a.y.index_select(0, sel).to(device)
            return
        # two pinned buffers, so gathering the next batch overlaps the copy of this one
        xv = a.x[view]
        bufs = [torch.empty((batch_size, *xv.shape[1:]), dtype=xv.dtype).pin_memory() for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        for i, start in enumerate(range(0, len(order), batch_size)):
            sel = order[start : start + batch_size]
            buf = bufs[i % 2][: len(sel)]
            if done[i % 2] is not None:
                done[i % 2].synchronize()  # the copy out of this buffer must have finished
            torch.index_select(xv, 0, sel, out=buf)
            x = a.gather(view, sel, device, x=buf)
            done[i % 2] = torch.cuda.Event()
            done[i % 2].record()
            yield x, a.y.index_select(0, sel).to(device, non_blocking=True)


class DiskTier:
    """Activations read from the shards on disk, a window of `window` shards at a time, the next
    window read by a background thread while the current one trains.

    Sample `p` of the split is stored in row `rows[p]`; rows no sample maps to (samples that left
    or that this process does not train on) are skipped. It follows the epoch's order as far as
    windows allow: shards are visited in the order of their first sample in `order`, and within a
    window samples come in their order in `order`. So every sample of the view is visited exactly
    once, shuffled within the window, not globally.
    """

    name = "disk"

    def __init__(self, cache: ActivationCache, rows: torch.Tensor | None = None, window: int = 4) -> None:
        stored = sum(s["count"] for s in cache.manifest["shards"] if s["view"] == 0)
        rows = torch.arange(stored) if rows is None else rows
        self.cache, self.window, self.codec = cache, window, cache.codec
        self.views, self.num_samples = cache.manifest["views"], len(rows)
        self.sample_of_row = torch.full((stored,), -1, dtype=torch.long)  # (R,) -1: no sample
        self.sample_of_row[rows] = torch.arange(len(rows))

    def _shards(self, view: int) -> list[tuple[str, int, int]]:
        """(file, first row, rows) of one view's shards."""
        out, start = [], 0
        for s in self.cache.manifest["shards"]:
            if s["view"] == view:
                out.append((s["file"], start, s["count"]))
                start += s["count"]
        return out

    def blocks(self, size: int) -> Iterator[Block]:
        for view in range(self.views):
            for file, start, n in self._shards(view):
                live = self.sample_of_row[start : start + n] >= 0
                if not live.any():
                    continue
                stored, y, key = self._read([file], with_keys=True)
                stored = {k: t[live] for k, t in stored.items()}
                y, key = y[live], key[live]
                for s in range(0, len(y), size):
                    yield (
                        self.codec.decode({k: t[s : s + size] for k, t in stored.items()}),
                        y[s : s + size],
                        key[s : s + size],
                        view,
                    )

    def _read(self, files: list[str], with_keys: bool = False) -> tuple:
        """The stored parts (`x` and the codec's parameters), y and (`with_keys`) key of shards."""
        names = ("x", *self.codec.params, "y") + (("key",) if with_keys else ())
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        for f in files:
            for k, t in read_tensors(self.cache.root / f, names).items():
                parts[k].append(t)
        t = {k: torch.cat(v) for k, v in parts.items()}
        stored = {k: t[k] for k in ("x", *self.codec.params)}
        return (stored, t["y"], t["key"]) if with_keys else (stored, t["y"])

    def batches(self, order, batch_size, view, device):
        rank = torch.full((self.num_samples,), len(order), dtype=torch.long)  # after the epoch: not in it
        rank[order] = torch.arange(len(order))  # rank[sample] = where it comes in this epoch
        rank = torch.cat([rank, torch.tensor([len(order)])])  # index -1 (a row without a sample)
        row_rank = rank[self.sample_of_row]  # (R,) where each stored row comes; len(order): never
        shards = []
        for file, start, n in self._shards(view % self.views):
            first = int(row_rank[start : start + n].min())
            if first < len(order):
                shards.append((first, file, start, n))
        shards.sort()
        windows = [shards[i : i + self.window] for i in range(0, len(shards), self.window)]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxdrop-readahead")
        try:
            ahead = pool.submit(self._read, [f for _, f, _, _ in windows[0]]) if windows else None
            # (stored, y, rank)
            carry: tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None = None
            for w, window in enumerate(windows):
                x, y = ahead.result()
                ahead = (
                    pool.submit(self._read, [f for _, f, _, _ in windows[w + 1]])
                    if w + 1 < len(windows)
                    else None
                )
                r = torch.cat([row_rank[s : s + n] for _, _, s, n in window])
                keep = r < len(order)
                x, y, r = {k: t[keep] for k, t in x.items()}, y[keep], r[keep]
                if carry is not None:
                    x = {k: torch.cat([carry[0][k], t]) for k, t in x.items()}
                    y, r = torch.cat([carry[1], y]), torch.cat([carry[2], r])
                perm = torch.argsort(r)
                full = len(y) - len(y) % batch_size if ahead is not None else len(y)
                for s in range(0, full, batch_size):
                    sel = perm[s : s + batch_size]
                    parts = {k: t.index_select(0, sel).to(device) for k, t in x.items()}
                    yield self.codec.decode(parts), y.index_select(0, sel).to(device)
                rest = perm[full:]
                carry = (
                    {k: t.index_select(0, rest) for k, t in x.items()},
                    y.index_select(0, rest),
                    r.index_select(0, rest),
                )
        finally:
            pool.shutdown(wait=True)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budgets(
    device: torch.device,
    cache_memory: int | None = None,
    host_free: int | None = None,
    device_free: int | None = None,
) -> dict[str, int]:
    """Bytes a cache may take in each memory tier: half of the free memory, measured now unless
    given, and at most `cache_memory` when given."""
    if device_free is None:
        device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    host_free = host_available_bytes() if host_free is None else host_free
    cap = cache_memory if cache_memory is not None else float("inf")
    host = int(min(host_free // 2, cap))
    if device.type == "cuda":  # on a GPU host memory is pinned, for asynchronous copies
        return {"device": int(min(device_free // 2, cap)), "pinned": host}
    return {"memory": host}


def choose_tier(
    nbytes: int,
    device: torch.device,
    host_free: int | None = None,
    device_free: int | None = None,
    cache_memory: int | None = None,
) -> str:
    """The fastest tier a cache of `nbytes` fits in (:func:`budgets`)."""
    room = budgets(device, cache_memory, host_free, device_free)
    for tier in ("device", "pinned", "memory"):
        if tier in room and nbytes <= room[tier]:
            return tier
    return "disk"


@dataclass(frozen=True)
class Placement:
    """Where a cache goes and in which format, and why (metrics.json, the screen)."""

    fmt: str  # fp32 | bf16 | fp16 | int8 | fp8
    tier: str  # device | pinned | memory | disk
    nbytes: int  # the cache's size in that format
    why: str


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def choose_placement(
    sizes: Callable[[str], int],
    device: torch.device,
    fmt: str = "auto",
    tier: str | None = None,
    amp: bool = False,
    cache_memory: int | None = None,
    room: dict[str, int] | None = None,
) -> Placement:
    """The format and tier of a cache whose size in format f is `sizes(f)`.

    `fmt="auto"`: the most exact format (codecs.AUTO_ORDER; under `amp` the activations are bf16,
    which bf16 stores exactly, so fp32 is not considered) whose cache fits the fastest tier; if
    none fits it, the next tier, and so on (on disk: the most exact). A given `fmt` or `tier` is
    kept; `room`: the budgets (:func:`budgets`, measured now when None)."""
    room = budgets(device, cache_memory) if room is None else room
    formats = [f for f in AUTO_ORDER if not (amp and f == "fp32")] if fmt == "auto" else [fmt]
    tiers = [tier] if tier else [t for t in TIERS if t == "disk" or t in room]
    for t in tiers:
        for f in formats:
            if t == "disk" or sizes(f) <= room.get(t, 0):
                return Placement(f, t, sizes(f), _why(f, t, formats, sizes, room, fmt, tier))
    f = formats[0]  # a given memory tier it does not fit; the tier was asked for
    return Placement(f, tiers[0], sizes(f), _why(f, tiers[0], formats, sizes, room, fmt, tier))


def _why(
    f: str,
    t: str,
    formats: list[str],
    sizes: Callable[[str], int],
    room: dict[str, int],
    fmt: str,
    tier: str | None,
) -> str:
    names = {"device": "device memory", "pinned": "pinned host memory", "memory": "host memory"}
    where = "disk" if t == "disk" else f"{names[t]} (room for {_mib(room.get(t, 0))})"
    if fmt != "auto":
        return f"{f} as asked, {_mib(sizes(f))} in {where}"
    exact = formats[: formats.index(f)]
    if not exact:
        return f"{f}, the most exact, {_mib(sizes(f))}: fits {where}"
    larger = " and ".join(f"{g} ({_mib(sizes(g))})" for g in exact)
    return f"{f} ({_mib(sizes(f))}) in {where}: {larger} would not fit"


def place(cache: ActivationCache, tier: str, device: torch.device, rows: torch.Tensor | None = None) -> Tier:
    """The cache in `tier`, its samples in the order of `rows` (the stored row of each; default:
    every row in stored order), read from its shards into memory unless `tier` is the disk."""
    if rows is None:
        rows = torch.arange(cache.stored_rows)
    if tier == "disk":
        return DiskTier(cache, rows)
    arrays = cache.load(rows, pin=tier == "pinned" and device.type == "cuda")
    if tier == "device":
        return MemoryTier(arrays.to(device), "device")
    return MemoryTier(arrays, "pinned" if tier == "pinned" and device.type == "cuda" else "memory")
