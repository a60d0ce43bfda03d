"""Cache a frozen prefix's activations for a dataset, for your own training loop.

`cache_activations` runs the prefix once over a dataset (K augmented views when the dataset has
`set_view`), writes the activations as an activation cache (safetensors shards + manifest, reused
when valid), and returns them as a map-style dataset of `(activation, label)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .cache import DTYPES, Arrays, codec, data_fingerprint, fingerprint_of, sample_keys, tensors_hash
from .cache.store import open_or_extend
from .errors import ConfigError

__all__ = ["cache_activations", "CachedActivations"]


class CachedActivations(Dataset):
    """`(activation, label)` pairs of a cached split; `set_view(v)` picks the augmented view
    (`v % views`), so epoch e can train on view e."""

    def __init__(self, arrays: Arrays, folder: Path) -> None:
        self.arrays, self.folder = arrays, folder
        self.views = arrays.x.shape[0]
        self.view = 0

    def __len__(self) -> int:
        return len(self.arrays.y)

    def set_view(self, view: int) -> None:
        self.view = view % self.views

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.arrays.gather(self.view, torch.tensor([i]), self.arrays.x.device)[0]
        return x, int(self.arrays.y[i])


@torch.no_grad()
def cache_activations(
    prefix: nn.Module,
    dataset: Dataset,
    folder: str | Path,
    *,
    views: int = 1,
    batch_size: int = 64,
    dtype: str = "fp32",
    device: str | torch.device | None = None,
) -> CachedActivations:
    """The activations of `prefix` over `dataset`, cached in `folder`.

    Args:
        prefix: the frozen prefix from `DropGraph.split` (or any module: it runs in eval mode).
        dataset: map-style dataset of `(image, label)`; with `set_view(v)`, `views` augmented views
            of every sample are cached.
        folder: the cache folder; a valid cache for the same prefix weights, transform, views and
            dtype is reused, computing only the samples it lacks when the dataset has
            `sample_keys()` (fxdrop's datasets); anything else fxdrop wrote there is rebuilt,
            other files are refused.
        views: augmented views per sample.
        batch_size: images per prefix forward.
        dtype: fp32 | bf16 | fp16 | int8 | fp8, how the activations are stored (cache/codecs.py:
            int8 and fp8 quantize, with a bound on every value's error).
        device: where the prefix runs (default: where its parameters are).

    Returns:
        A CachedActivations dataset of `(activation (C, H, W) float32, label)`.

    Example:
        >>> prefix, suffix = fxdrop.trace(model, x).split("layer3")
        >>> train = fxdrop.cache_activations(prefix, train_ds, "cache/train", views=2)
    """
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if views < 1:
        raise ConfigError("views", f"must be a positive whole number, got {views!r}")
    folder = Path(folder)
    params = list(prefix.parameters())
    device = (
        torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    )
    fp = _fingerprint(prefix, dataset, views, dtype)
    keys = sample_keys(dataset)  # (N,)
    was_training = prefix.training
    prefix.eval()

    def blocks(positions: torch.Tensor | None):
        return _prefix_blocks(prefix, dataset, keys, positions, views, batch_size, device)

    try:
        cache, rows, _ = open_or_extend(folder, fp, keys, blocks, dtype, {})
    finally:
        prefix.train(was_training)
    return CachedActivations(cache.load(rows), folder)


def _fingerprint(prefix: nn.Module, dataset: Dataset, views: int, dtype: str) -> str:
    """What a cache holds: the prefix's code and weights, the data, the views and the format."""
    code = getattr(getattr(prefix, "eval_gm", None), "code", type(prefix).__qualname__)
    return fingerprint_of(
        {
            "prefix": code,
            "weights": tensors_hash(sorted(prefix.state_dict().items())),
            "data": data_fingerprint(dataset),
            "views": views,
            "format": codec(dtype).tag(),
        }
    )


def _prefix_blocks(
    prefix: nn.Module,
    dataset: Dataset,
    keys: torch.Tensor,
    positions: torch.Tensor | None,
    views: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(activations, labels, keys, view) of the samples at `positions` (None: all), view by view."""
    sel = torch.arange(len(dataset)) if positions is None else positions
    for v in range(views):
        if hasattr(dataset, "set_view"):
            dataset.set_view(v)
        for start in range(0, len(sel), batch_size):
            idx = sel[start : start + batch_size]
            x, y = default_collate([dataset[i] for i in idx.tolist()])
            yield prefix(x.to(device)), torch.as_tensor(y), keys[idx], v
