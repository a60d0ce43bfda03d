"""Where a cache lives while training reads it: device memory, pinned host memory, host memory or
memory-mapped shards on disk, behind one protocol (`Tier`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from safetensors import safe_open

from .format import ActivationCache, Arrays, Block

__all__ = ["Tier", "MemoryTier", "DiskTier", "choose_tier", "place", "host_available_bytes"]

TIERS = ("device", "pinned", "memory", "disk")


class Tier(Protocol):
    """A split's cached activations, readable in training order and in stored order."""

    name: str  # device | pinned | memory | disk
    views: int  # augmented views per sample
    num_samples: int

    def batches(self, order: torch.Tensor, batch_size: int, view: int,
                device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`(x, y)` batches of view `view` on `device`, in the epoch's order (`order`: positions
        of the cached samples)."""
        ...

    def blocks(self, size: int) -> Iterator[Block]:
        """`(x, y, key, view)` blocks of every sample, view by view (to compute a later cut from this one)."""
        ...


class MemoryTier:
    """Activations resident in memory: on the device (a batch is an index into it), in pinned
    host memory (gathered into pinned buffers, copied asynchronously), or in host memory."""

    def __init__(self, arrays: Arrays, name: str) -> None:
        self.arrays, self.name = arrays, name
        self.views, self.num_samples = arrays.x.shape[0], len(arrays.y)

    def blocks(self, size: int) -> Iterator[Block]:
        a = self.arrays
        for v in range(self.views):
            for s in range(0, self.num_samples, size):
                yield a.x[v, s : s + size], a.y[s : s + size], a.key[s : s + size], v

    def batches(self, order, batch_size, view, device):
        xv, y = self.arrays.x[view % self.views], self.arrays.y
        order = order.to(xv.device)
        if self.name != "pinned" or device.type != "cuda":
            for start in range(0, len(order), batch_size):
                sel = order[start : start + batch_size]
                yield xv.index_select(0, sel).to(device), y.index_select(0, sel).to(device)
            return
        # reason: two pinned buffers, so gathering the next batch overlaps the copy of this one
        bufs = [torch.empty((batch_size, *xv.shape[1:]), dtype=xv.dtype).pin_memory() for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        for i, start in enumerate(range(0, len(order), batch_size)):
            sel = order[start : start + batch_size]
            buf = bufs[i % 2][: len(sel)]
            if done[i % 2] is not None:
                done[i % 2].synchronize()  # reason: the copy out of this buffer must have finished
            torch.index_select(xv, 0, sel, out=buf)
            x = buf.to(device, non_blocking=True)
            done[i % 2] = torch.cuda.Event()
            done[i % 2].record()
            yield x, y.index_select(0, sel).to(device, non_blocking=True)


class DiskTier:
    """Activations read from memory-mapped shards, a window of `window` shards at a time, the next
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
        self.cache, self.window = cache, window
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
                x, y, key = (t[live] for t in self._read([file], ("x", "y", "key")))
                for s in range(0, len(y), size):
                    yield x[s : s + size], y[s : s + size], key[s : s + size], view

    def _read(self, files: list[str], keys=("x", "y")) -> list[torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for f in files:
            with safe_open(str(self.cache.root / f), framework="pt") as st:
                for k in keys:
                    parts[k].append(st.get_tensor(k))
        return [torch.cat(parts[k]) for k in keys]

    def batches(self, order, batch_size, view, device):
        rank = torch.full((self.num_samples,), len(order), dtype=torch.long)  # after the epoch: not in it
        rank[order] = torch.arange(len(order))  # rank[sample] = where it comes in this epoch
        rank = torch.cat([rank, torch.tensor([len(order)])])  # reason: index -1 (a row without a sample)
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
            carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (x, y, rank)
            for w, window in enumerate(windows):
                x, y = ahead.result()
                ahead = pool.submit(self._read, [f for _, f, _, _ in windows[w + 1]]) if w + 1 < len(windows) else None
                r = torch.cat([row_rank[s : s + n] for _, _, s, n in window])
                keep = r < len(order)
                x, y, r = x[keep], y[keep], r[keep]
                if carry is not None:
                    x, y, r = torch.cat([carry[0], x]), torch.cat([carry[1], y]), torch.cat([carry[2], r])
                perm = torch.argsort(r)
                full = len(y) - len(y) % batch_size if ahead is not None else len(y)
                for s in range(0, full, batch_size):
                    sel = perm[s : s + batch_size]
                    yield x.index_select(0, sel).to(device), y.index_select(0, sel).to(device)
                rest = perm[full:]
                carry = (x.index_select(0, rest), y.index_select(0, rest), r.index_select(0, rest))
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


def choose_tier(nbytes: int, device: torch.device, host_free: int | None = None, device_free: int | None = None) -> str:
    """The fastest tier a cache of `nbytes` fits in, keeping half of the free memory for the rest.
    Free memory is measured now unless given."""
    if device_free is None:
        device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    host_free = host_available_bytes() if host_free is None else host_free
    if device.type == "cuda" and nbytes <= device_free // 2:
        return "device"
    if nbytes <= host_free // 2:
        return "pinned" if device.type == "cuda" else "memory"
    return "disk"


def place(cache: ActivationCache, arrays: Arrays | None, tier: str, device: torch.device,
          rows: torch.Tensor | None = None) -> Tier:
    """The cache in `tier`, its samples in the order of `rows` (the stored row of each; default:
    every row in stored order); `arrays` are all its rows already in host memory, if any."""
    if rows is None:
        rows = torch.arange(sum(s["count"] for s in cache.manifest["shards"] if s["view"] == 0))
    if tier == "disk":
        return DiskTier(cache, rows)
    arrays = arrays or cache.load()
    if not torch.equal(rows, torch.arange(len(arrays.y))):
        arrays = arrays.rows(rows)
    if tier == "device":
        return MemoryTier(Arrays(arrays.x.to(device), arrays.y.to(device), arrays.key.to(device)), "device")
    if tier == "pinned" and device.type == "cuda":
        return MemoryTier(Arrays(arrays.x.pin_memory(), arrays.y, arrays.key), "pinned")
    return MemoryTier(arrays, "memory")
