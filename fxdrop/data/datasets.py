"""Datasets whose random augmentation is a pure function of (seed, view, sample index), the bundle
`build_data` returns, and class-balanced subsets."""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ..records import DataSummary
from .keys import _M64, _sample_key

# timm.data.IMAGENET_DEFAULT_MEAN/STD, written out so that Fashion-MNIST without a model does not
# pay timm's import, which is slow
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class AugmentedDataset(Dataset):
    """Map-style dataset of ``(x, y)``: ``x`` a float32 tensor ``(3, H, W)``, ``y`` an int.

    The random augmentation of sample ``i`` under view ``v`` depends only on ``(seed, v, i)``: the
    same triple gives a bit-identical tensor in any process or DataLoader worker. Without
    augmentation (``augment=False``, and always for validation) views do not matter.

    Note: ``set_view`` changes this object only; DataLoader workers started with
    ``persistent_workers=True`` keep the view they were started with. Use :meth:`get` with an
    explicit view when that matters.

    Attributes:
        labels: ``(N,)`` int64 tensor, the label of every sample.
        seed: seed of the augmentation (and of the subset, when a limit was given).
        augment: whether samples are randomly augmented.
        view: the view ``__getitem__`` uses; see :meth:`set_view`.
    """

    def __init__(self, labels: torch.Tensor, *, seed: int, augment: bool) -> None:
        self.labels = labels  # (N,) int64
        self._label_list: list[int] = labels.tolist()  # int(tensor[i]) is slow per sample
        self.seed = int(seed)
        self.augment = bool(augment)
        self.view = 0
        self._fingerprint: str | None = None
        self._keys: list[int] | None = None

    def __len__(self) -> int:
        return len(self._label_list)

    def set_view(self, v: int) -> None:
        """Select the augmented view that ``__getitem__`` returns (e.g. the epoch number)."""
        self.view = operator.index(v)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.get(i, self.view)

    def get(self, i: int, view: int) -> tuple[torch.Tensor, int]:
        """Sample ``i`` under ``view``: ``(x (3, H, W) float32, y int)``."""
        i = self._check_index(i)
        # keyed by the sample's identity, not its position, so a sample keeps its views
        # when the data around it changes (an update's cached views stay what training would make)
        key = _sample_key(self.seed, view, self._key_list()[i] & _M64) if self.augment else None
        return self._load(i, key), self._label_list[i]

    def sample_ids(self) -> list[str]:
        """What each sample is, independent of its position: for files their path relative to the
        data folder and a hash of their content, for Fashion-MNIST the IDX file and index."""
        raise NotImplementedError

    def sample_keys(self) -> torch.Tensor:
        """``(N,)`` int64: a 64-bit hash of each sample's :meth:`sample_ids` entry. The activation
        cache stores samples under these keys, so it can take new samples and let others go."""
        return torch.tensor(self._key_list(), dtype=torch.int64)

    def _key_list(self) -> list[int]:
        if self._keys is None:
            self._keys = [_id_key(s) for s in self.sample_ids()]  # a list: tensor[i] is slow per sample
        return self._keys

    def recipe(self) -> str:
        """sha256 hex of how samples become tensors (transform, augmentation seed), not of which
        samples there are: with :meth:`sample_keys` it says what a cached activation is."""
        h = hashlib.sha256(self.describe().encode())
        h.update(json.dumps({"augment": self.augment, "seed": self.seed if self.augment else None}).encode())
        return h.hexdigest()

    def describe(self) -> str:
        """A text that changes whenever the transform does (part of the fingerprint)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 hex of the sample listing, the transform and (when augmenting) the seed.

        Computed once per dataset (files are stat'ed or hashed then); a new :func:`build_data` sees
        later changes.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self._listing_digest().encode())
            h.update(self.recipe().encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # subclass hooks ------------------------------------------------------------------------

    def _load(self, i: int, key: int | None) -> torch.Tensor:
        """Sample ``i`` as ``(3, H, W)`` float32, augmented from ``key`` (None: no augmentation)."""
        raise NotImplementedError

    def _listing_digest(self) -> str:
        """sha256 hex of what the samples are read from (files, sizes, mtimes or content hashes)."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for a dataset of {n}")
        return i


@dataclass(frozen=True)
class DataBundle:
    """Train and validation datasets with their class names.

    Build one with :func:`build_data`.
    """

    train: AugmentedDataset  # (x (3, H, W) float32, y int), augmented per (seed, view, index)
    val: AugmentedDataset  # same, never augmented
    classes: tuple[str, ...]  # class names; label y is classes[y]
    source: str  # 'fashion-mnist' or the data directory's absolute path
    skipped: int = 0  # unreadable image files left out (ImageFolder sources only)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> DataSummary:
        """Where the data came from and how much of it there is (the runs' "data" event)."""
        return DataSummary(self.source, len(self.train), len(self.val), len(self.classes), self.skipped)


def class_balanced_indices(labels: Sequence[int] | torch.Tensor, n: int, seed: int) -> list[int]:
    """``n`` sample indices with the classes as even as possible; sorted, deterministic per seed.

    Classes with fewer than their share contribute all their samples and the rest is spread over
    the others; the remainder goes to classes chosen by the seed. Within a class the samples are
    taken in a seeded order that does not depend on ``n``, so a larger ``n`` mostly extends a
    smaller one.

    Args:
        labels: the label of every sample.
        n: how many samples to pick; all of them when ``n >= len(labels)``.
        seed: selects which samples (and which classes get the remainder).

    Returns:
        Sorted indices into ``labels``.

    Example:
        >>> class_balanced_indices([0, 0, 0, 1, 1, 2], 3, seed=0)  # one of each class
        [0, 3, 5]
    """
    y = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(y):
        return list(range(len(y)))
    classes = torch.unique(y).tolist()  # ascending
    members = {c: torch.nonzero(y == c).flatten() for c in classes}
    size = {c: len(members[c]) for c in classes}

    # water filling: classes smaller than the even share give all they have
    quota: dict[int, int] = {}
    open_ = sorted(classes, key=lambda c: (size[c], c))
    remaining = n
    while open_:
        share = remaining // len(open_)
        small = [c for c in open_ if size[c] <= share]
        if not small:
            break
        for c in small:
            quota[c] = size[c]
            remaining -= size[c]
        open_ = [c for c in open_ if c not in quota]
    if open_:
        base, extra = divmod(remaining, len(open_))
        g = torch.Generator().manual_seed(seed & _M64)
        open_sorted = sorted(open_)
        lucky = {open_sorted[k] for k in torch.randperm(len(open_sorted), generator=g)[:extra].tolist()}
        for c in open_sorted:
            quota[c] = base + (c in lucky)

    chosen: list[int] = []
    for c in classes:
        key = _sample_key(seed, c, 0)
        order = torch.randperm(size[c], generator=torch.Generator().manual_seed(key))
        chosen += members[c][order[: quota[c]]].tolist()
    return sorted(chosen)


def _id_key(sample_id: str) -> int:
    """A signed 64-bit key from a sample identity (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little", signed=True)


def _val_count(limit: int, num_classes: int) -> int:
    return max(limit // 4, num_classes)


def _mean_std(model: nn.Module | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if model is None:
        return _IMAGENET_MEAN, _IMAGENET_STD
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)  # ImageNet mean/std when the model has no config
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    if len(mean) == 1:  # a single-channel config: the same statistics on all three channels
        mean, std = mean * 3, std * 3
    return mean, std
