"""Where batches come from. The training loop asks its feed for batches and never branches on how
they are made:

    ImageFeed   images from the datasets (the whole model trains)
    PrefixFeed  images through the frozen prefix, recomputed every step (freeze-only, `cache=False`)
    CacheFeed   the prefix's cached activations, read from their tier

`build_cache_feed` makes a CacheFeed at a new cut from the current feed: from the images through
the prefix, or from the cached activations through the segments between the old and new cut;
`RunFeeds` gives a run the feed at each cut it enters and removes the caches no longer fed from.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..cache import (
    CODECS,
    ActivationCache,
    CacheStore,
    Placement,
    Reuse,
    Tier,
    data_fingerprint,
    sample_keys,
    shard_bytes_for,
)
from ..cache.format import Block
from ..config import FitConfig
from ..graph import DropGraph
from ..records import CacheProgress

__all__ = ["Batching", "Feed", "ImageFeed", "PrefixFeed", "CacheFeed", "build_cache_feed", "RunFeeds"]

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (x, y) on the device


@dataclass(frozen=True)
class Batching:
    """How batches are made on this process."""

    device: torch.device
    batch_size: int  # per rank
    amp: bool  # bf16 autocast
    channels_last: bool
    workers: int  # DataLoader workers for images

    @property
    def eval_batch_size(self) -> int:
        """Batches without a backward (validation, cache builds) are twice as large."""
        return 2 * self.batch_size

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @torch.no_grad()
    def frozen(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """A frozen piece of the model applied to a batch, as training applies it."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            return fn(self.layout(x))


class Feed(Protocol):
    #: the prefix's activations come from a cache (its forward is skipped); else the images,
    #: through the frozen prefix when there is one
    cached: bool
    #: the cache's format and tier, and why (None: not cached)
    placement: Placement | None
    #: the cache's tier (None: not cached), its bytes, and its folder per split ({}: none)
    tier_name: str | None
    nbytes: int
    folders: dict[str, Path]

    def train_batches(self, order: torch.Tensor, epoch: int) -> Batches:
        """This epoch's training batches; `order`: positions of this rank's samples."""
        ...

    def val_batches(self) -> Batches: ...


def _set_view(dataset: Dataset, view: int) -> None:
    if hasattr(dataset, "set_view"):
        dataset.set_view(view)


def _image_batches(
    dataset: Dataset, indices: torch.Tensor, order: torch.Tensor, view: int, batch_size: int, b: Batching
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The samples `indices[order]` of augmented `view`, in batches: `(x, y, dataset indices)`."""
    sel = indices[order].tolist()
    # its own generator, so iterating never draws from the global RNG that dropout uses
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sel,
        num_workers=b.workers,
        pin_memory=b.device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )
    _set_view(dataset, view)  # worker processes copy the dataset, with its view, when iteration starts
    batches, start = iter(loader), 0
    while True:
        # the view is the dataset's state, shared by every reader of it in this process;
        # another reader between two batches (the step costs' timing batch, a cache build) sets its own
        _set_view(dataset, view)
        try:
            x, y = next(batches)
        except StopIteration:
            return
        idx = torch.tensor(sel[start : start + len(y)])
        start += len(y)
        yield x.to(b.device, non_blocking=True), torch.as_tensor(y).to(b.device, non_blocking=True), idx


class ImageFeed:
    """Images from the datasets; training epoch e uses augmented view e. `indices[split]`: the
    dataset indices this process trains on, `keys[split]`: every sample's cache key."""

    cached, placement, tier_name, nbytes = False, None, None, 0

    def __init__(self, data: dict[str, Dataset], indices: dict[str, torch.Tensor], b: Batching) -> None:
        self.data, self.indices, self.b = data, indices, b  # keys "train", "val"
        self.keys = {split: sample_keys(ds) for split, ds in data.items()}  # (N,) int64 per split
        self.folders: dict[str, Path] = {}

    def batch_count(self, split: str) -> int:
        """Batches in one pass over this process's `split` (validation batches are larger)."""
        size = self.b.batch_size if split == "train" else self.b.eval_batch_size
        return math.ceil(len(self.indices[split]) / size)

    def own_keys(self, split: str) -> torch.Tensor:
        """`(n,)` the keys of this process's samples, in its order."""
        return self.keys[split][self.indices[split]]

    def images(self, split: str, order: torch.Tensor, view: int, batch_size: int) -> Batches:
        for x, y, _ in _image_batches(self.data[split], self.indices[split], order, view, batch_size, self.b):
            yield self.b.layout(x), y

    def train_batches(self, order, epoch):
        return self.images("train", order, epoch, self.b.batch_size)

    def val_batches(self):
        return self.images("val", torch.arange(len(self.indices["val"])), 0, self.b.eval_batch_size)

    def blocks(
        self,
        split: str,
        views: int,
        fn: Callable[[torch.Tensor], torch.Tensor],
        progress: Callable[[CacheProgress], None],
        positions: torch.Tensor | None = None,
    ) -> Iterator[Block]:
        """`(fn(x), y, key, view)` over this process's samples (or those at `positions` of them)
        and every view (to build a cache)."""
        order = torch.arange(len(self.indices[split])) if positions is None else positions
        n, size = len(order), self.b.eval_batch_size
        for v in range(views):
            for i, (x, y, idx) in enumerate(
                _image_batches(self.data[split], self.indices[split], order, v, size, self.b)
            ):
                progress(CacheProgress(split, v, min((i + 1) * size, n), n))
                yield self.b.frozen(fn, x), y, self.keys[split][idx], v


class PrefixFeed:
    """Images through the frozen prefix every step; epoch e uses view e % views, as the cache would."""

    cached, placement, tier_name, nbytes = False, None, None, 0

    def __init__(self, images: ImageFeed, prefix: nn.Module, views: int) -> None:
        self.images, self.prefix, self.views = images, prefix, views
        self.folders: dict[str, Path] = {}

    def train_batches(self, order, epoch):
        for x, y in self.images.images("train", order, epoch % self.views, self.images.b.batch_size):
            yield self.images.b.frozen(self.prefix, x), y

    def val_batches(self):
        for x, y in self.images.val_batches():
            yield self.images.b.frozen(self.prefix, x), y


class CacheFeed:
    """Cached activations at `cut`, one tier per split, in the format and tier of `placement`;
    epoch e uses cached view e % views."""

    cached = True

    def __init__(
        self,
        cut: int,
        tiers: dict[str, Tier],
        folders: dict[str, Path],
        nbytes: int,
        b: Batching,
        placement: Placement | None = None,
    ) -> None:
        self.cut, self.tiers, self.folders, self.nbytes, self.b = cut, tiers, folders, nbytes, b
        self.placement = placement
        self.tier_name = tiers["train"].name

    def _batches(self, split: str, order: torch.Tensor, view: int, batch_size: int) -> Batches:
        for x, y in self.tiers[split].batches(order, batch_size, view, self.b.device):
            yield self.b.layout(x), y

    def train_batches(self, order, epoch):
        return self._batches("train", order, epoch % self.tiers["train"].views, self.b.batch_size)

    def val_batches(self):
        return self._batches("val", torch.arange(self.tiers["val"].num_samples), 0, self.b.eval_batch_size)

    def blocks(self, split: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Block]:
        for a, y, key, v in self.tiers[split].blocks(self.b.eval_batch_size):
            yield self.b.frozen(fn, a.to(self.b.device)), y, key, v


def build_cache_feed(
    store: CacheStore,
    dg: DropGraph,
    source: ImageFeed | CacheFeed,
    images: ImageFeed,
    cut: int,
    prefix: nn.Module,
    *,
    views: int,
    data_fps: dict[str, str],
    b: Batching,
    choose: Callable[[str | None], Placement],
    progress: Callable[[CacheProgress], None],
    prune: bool = False,
    shard_bytes: int | None = None,
) -> tuple[CacheFeed, Reuse]:
    """Cache the activations at `cut` for both splits and return their feed and what was reused.
    `choose(kept)` says the format and tier; `kept` is the format of a valid cache already there
    (a resumed run's, an update's), which is reused as written, else None.
    A valid cache is reopened and only the samples it lacks are computed: from the images through
    `prefix` when `source` is the ImageFeed or the cache lacks only some samples; from `source`'s
    cached activations through the segments in between when it is a CacheFeed and nothing valid
    is there. `data_fps`: each split's `data_fingerprint`; `prune`: samples no longer in the data
    leave the cache."""
    cp = dg.cut_points[cut]
    state = prefix.state_dict()
    m = ActivationCache.read_manifest(store.folder(cut, cp.name, "train"))
    kept = m.get("dtype") if m and m.get("dtype") in CODECS else None
    if kept and m.get("fingerprint") != store.fingerprint(
        prefix.eval_gm.code, state, cp.name, data_fps["train"], views, kept
    ):
        kept = None
    placement = choose(kept)
    tiers, folders, nbytes, reuse = {}, {}, 0, Reuse()
    for split in ("train", "val"):
        n_views = views if split == "train" else 1
        fp = store.fingerprint(prefix.eval_gm.code, state, cp.name, data_fps[split], n_views, placement.fmt)

        def blocks(positions, split=split, n_views=n_views):
            if positions is None and source.cached:
                return source.blocks(split, dg.between(source.cut, cut))
            return images.blocks(split, n_views, prefix, progress, positions)

        folder = store.folder(cut, cp.name, split)
        cache, tiers[split], r = store.open_or_extend(
            folder,
            fp,
            images.own_keys(split),
            blocks,
            placement.tier,
            b.device,
            split,
            forget_absent=images.keys[split] if prune else None,
            fmt=placement.fmt,
            shard_bytes=shard_bytes,
        )
        folders[split], nbytes, reuse = folder, nbytes + cache.nbytes, reuse + r
    return CacheFeed(cut, tiers, folders, nbytes, b, placement), reuse


class RunFeeds:
    """The feeds of one run on the graph `dg`: its `images`, and at a cut the feed the suffix
    trains from (a cache in `store`, or the images through the frozen prefix).

    Args:
        cfg: the run's settings (whether to cache, the views and memory of a cache, keep_cache).
        place: the format and tier of a cache at a cut (`CutChoice.placement`).
        progress: called with each `CacheProgress` while a cache is built.
        tmp: the temporary folder `store` lives in when no cache folder was named (goes at close).
    """

    def __init__(
        self,
        images: ImageFeed,
        dg: DropGraph,
        cfg: FitConfig,
        store: CacheStore,
        place: Callable[[int, str | None], Placement],
        progress: Callable[[CacheProgress], None],
        tmp: tempfile.TemporaryDirectory | None,
    ) -> None:
        self.images, self.dg, self.cfg, self.store = images, dg, cfg, store
        self.place, self.progress, self.tmp = place, progress, tmp

    @functools.cached_property
    def data_fps(self) -> dict[str, str]:
        """Each split's `data_fingerprint`, taken when the first cache needs it (an unkeyed
        dataset is read for it, which may draw from its random augmentation)."""
        return {split: data_fingerprint(ds) for split, ds in self.images.data.items()}

    def at(self, old: Feed, cut: int, prefix: nn.Module, cache: bool, prune: bool) -> tuple[Feed, Reuse]:
        """The feed at `cut` after `old` (whose cache folders not reused go): with `cache`, a
        cache at `cut` (built from `old`, or reopened and completed; `prune`: samples no longer
        in the data leave it), else the images through the frozen `prefix`. Returns it and what
        its cache reused."""
        if cache and self.cfg.cache:
            feed, reuse = build_cache_feed(
                self.store,
                self.dg,
                old if old.cached else self.images,
                self.images,
                cut,
                prefix,
                views=self.cfg.cache_views,
                data_fps=self.data_fps,
                b=self.images.b,
                choose=lambda kept: self.place(cut, kept),
                progress=self.progress,
                prune=prune,
                shard_bytes=shard_bytes_for(self.cfg.cache_memory),
            )
        else:
            feed, reuse = PrefixFeed(self.images, prefix, self.cfg.cache_views), Reuse()
        for split, folder in old.folders.items():
            if folder != feed.folders.get(split):
                self.store.remove(folder)
        return feed, reuse

    def close(self, feed: Feed, keep_cache: bool | None = None) -> None:
        """The run is over: `feed`'s cache folders go unless `keep_cache` (None: as
        `FitConfig.keep_cache` says; a temporary folder always goes)."""
        keep_cache = self.cfg.keep_cache if keep_cache is None else keep_cache
        if not keep_cache or self.tmp is not None:
            for folder in feed.folders.values():
                self.store.remove(folder)
        self.store.remove_root_if_empty()
        if self.tmp is not None:
            self.tmp.cleanup()
