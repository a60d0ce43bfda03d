"""A split's stored activations in host or device memory, as stored (decoded batch by batch), and
how a cache folder's shards are read into them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CacheError
from .codecs import CODECS, Codec, codec
from .manifest import shards_rows
from .shards import read_tensors

__all__ = ["Arrays", "read_rows"]


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


def read_rows(root: Path, manifest: dict, rows: torch.Tensor | None = None, pin: bool = False) -> Arrays:
    """Read the stored rows `rows` (default: every one, in stored order) of every view of the cache
    in `root` into host memory (pinned with `pin`), as stored.

    Each shard is read into its place in arrays allocated once: the peak is the arrays plus one
    shard. reason for the own loop rather than safetensors' `load_file` per shard and a join: the
    join would hold the cache twice."""
    c, views, stored = codec(manifest["dtype"]), manifest["views"], shards_rows(manifest["shards"])
    rows = torch.arange(stored) if rows is None else rows
    slot = torch.full((stored,), -1, dtype=torch.long)  # (R,) where each stored row goes; -1: not read
    slot[rows] = torch.arange(len(rows))
    x = params = None
    y, key = torch.empty(len(rows), dtype=torch.long), torch.empty(len(rows), dtype=torch.long)
    start = dict.fromkeys(range(views), 0)
    for shard in manifest["shards"]:
        v, n = shard["view"], shard["count"]
        to = slot[start[v] : start[v] + n]
        start[v] += n
        take = to >= 0
        if not take.any():
            continue
        t = read_tensors(root / shard["file"])
        if take.all():  # no boolean-indexed copy of a whole shard
            take = slice(None)
        if x is None:
            x = torch.empty((views, len(rows), *t["x"].shape[1:]), dtype=t["x"].dtype, pin_memory=pin)
            params = {k: torch.empty((views, len(rows), *t[k].shape[1:]), dtype=t[k].dtype) for k in c.params}
        x[v].index_copy_(0, to[take], t["x"][take])
        for k in params:
            params[k][v].index_copy_(0, to[take], t[k][take])
        if v == 0:
            y.index_copy_(0, to[take], t["y"][take])
            key.index_copy_(0, to[take], t["key"][take])
    if x is None:
        raise CacheError(
            f"cache '{root}' holds none of the samples asked for; delete the folder to rebuild it"
        )
    return Arrays(x, y, key, params, c)
