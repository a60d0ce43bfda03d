"""Training data: Fashion-MNIST from its IDX files or an ImageFolder tree, as datasets whose random
augmentation is a pure function of (seed, view, sample index).

The activation cache stores prefix outputs for a given *view* of each sample; a later epoch asks for
another view. For that to be reproducible, augmenting sample ``i`` under view ``v`` must give the
same tensor in every process and every DataLoader worker, whatever was drawn before. So no dataset
here reads an RNG whose state it does not set: Fashion-MNIST draws its crop and flip from a hash of
(seed, v, i); the ImageFolder path seeds Python's, NumPy's and torch's global RNGs from that hash
around timm's transforms (which use them) and puts their states back afterwards.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import random
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from .errors import DataError

__all__ = [
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "AugmentedDataset",
    "DataBundle",
    "build_data",
    "load_fashion_mnist",
    "export_fashion_mnist",
    "class_balanced_indices",
]

FASHION_MNIST = "fashion-mnist"
# torchvision's names, except 'T-shirt/top', whose slash cannot be a folder name; the same names
# are used by export_fashion_mnist, so both sources have the same class set.
FASHION_MNIST_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SYSTEM_FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_OFFLINE_HINT = "apt-get install dataset-fashion-mnist, or set FXDROP_DATA to a folder holding the IDX files"
# timm.data.IMAGENET_DEFAULT_MEAN/STD, written out so that Fashion-MNIST without a model does not
# pay timm's import (about 1 s)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_M64 = 0xFFFF_FFFF_FFFF_FFFF
# reason: swapping the global RNGs around a timm transform must not interleave between threads
# (a read-ahead thread and the main thread); processes (DataLoader workers) each have their own.
_GLOBAL_RNG_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Per-sample randomness
# ---------------------------------------------------------------------------------------------


_GOLDEN, _MIX1, _MIX2 = 0x9E37_79B9_7F4A_7C15, 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a fixed, platform-independent 64-bit mix."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` over a uint64 array."""
    with np.errstate(over="ignore"):  # reason: uint64 arithmetic is meant to wrap
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
        return x ^ (x >> np.uint64(31))


def _sample_key(seed: int, view: int, index: int) -> int:
    """A 64-bit key that depends only on (seed, view, index)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (view & _M64)) ^ (index & _M64))


def _sample_keys(seed: int, view: int, indices: np.ndarray) -> np.ndarray:
    """:func:`_sample_key` for an array of indices: ``(B,)`` uint64."""
    sv = np.uint64(_splitmix64(_splitmix64(seed & _M64) ^ (view & _M64)))
    return _splitmix64_np(sv ^ indices.astype(np.uint64))  # (B,)


@contextmanager
def _seeded_global_rngs(key: int, with_numpy: bool = True) -> Iterator[None]:
    """Seed Python's, torch's CPU and (optionally) NumPy's global RNGs from `key`; restore them on exit.

    Args:
        key: 64-bit seed.
        with_numpy: also NumPy's; saving and restoring its state costs about 150 us.
    """
    with _GLOBAL_RNG_LOCK:
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        np_state = np.random.get_state() if with_numpy else None
        random.seed(key)
        # reason: torch.manual_seed would also reseed (and queue an init of) every CUDA generator
        torch.default_generator.manual_seed(key)
        if with_numpy:
            np.random.seed(key & 0xFFFF_FFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
            if np_state is not None:
                np.random.set_state(np_state)


def _uses_numpy_rng(transform: Callable) -> bool:
    """Whether a timm transform pipeline may draw from NumPy's global RNG.

    Of timm's transforms only the auto-augment family (RandAugment, AugMix, ...) does; the rest,
    and torchvision's, draw from Python's `random` and torch.
    """
    if type(transform).__module__.startswith("timm.data.auto_augment"):
        return True
    return any(_uses_numpy_rng(t) for t in getattr(transform, "transforms", []))  # nested Compose


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class AugmentedDataset(Dataset):
    """Map-style dataset of ``(x, y)``: ``x`` a float32 tensor ``(3, H, W)``, ``y`` an int.

    The random augmentation of sample ``i`` under view ``v`` depends only on ``(seed, v, i)``: the
    same triple gives a bit-identical tensor in any process or DataLoader worker. Without
    augmentation (``augment=False``, and always for validation) views do not matter.

    Note: ``set_view`` changes this object only; DataLoader workers started with
    ``persistent_workers=True`` keep the view they were started with. Use :meth:`get` or
    :meth:`get_batch` with an explicit view when that matters.

    Attributes:
        labels: ``(N,)`` int64 tensor, the label of every sample.
        seed: seed of the augmentation (and of the subset, when a limit was given).
        augment: whether samples are randomly augmented.
        view: the view ``__getitem__`` uses; see :meth:`set_view`.
    """

    def __init__(self, labels: torch.Tensor, *, seed: int, augment: bool) -> None:
        self.labels = labels  # (N,) int64
        self._label_list: list[int] = labels.tolist()  # reason: int(tensor[i]) is slow per sample
        self.seed = int(seed)
        self.augment = bool(augment)
        self.view = 0
        self._fingerprint: str | None = None

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
        key = _sample_key(self.seed, view, i) if self.augment else None
        return self._load(i, key), self._label_list[i]

    def get_batch(
        self, indices: Sequence[int] | torch.Tensor, view: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``indices`` under ``view`` (default: the current view), stacked.

        Equal, bit for bit, to stacking :meth:`get` over the indices.

        Returns:
            ``x`` ``(B, 3, H, W)`` float32 and ``y`` ``(B,)`` int64.
        """
        view = self.view if view is None else view
        idx = [self._check_index(i) for i in torch.as_tensor(indices).flatten().tolist()]
        xs = [self.get(i, view)[0] for i in idx]
        return torch.stack(xs), self.labels[idx]

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
            h.update(self.describe().encode())
            h.update(json.dumps({"augment": self.augment, "seed": self.seed if self.augment else None}).encode())
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
class _TensorTransform:
    """Tensor-op transform of uint8 grayscale images: resize, augment, 3 channels, normalise.

    The augmentation of a sample is read from its 64-bit key: the crop offsets from bits 0-20 and
    21-41, a horizontal flip (probability 1/2) from bit 63. :meth:`one` and :meth:`batch` give
    bit-identical results (the batch path gathers crops with indexing, the single path slices).
    """

    img_size: int  # output side in pixels; bilinear resize, antialiased when it shrinks
    mean: tuple[float, float, float]  # per-channel mean of the model's data config
    std: tuple[float, float, float]  # per-channel std of the model's data config
    augment: bool = True  # random crop with padding + horizontal flip (train only)
    pad: int = 0  # crop padding in pixels; build_data uses img_size // 8
    pad_value: float = 0.0  # zero = black, Fashion-MNIST's background (before normalisation)

    @cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return mean, std

    def _offsets(self, key: int) -> tuple[int, int, bool]:
        span = 2 * self.pad + 1
        return key % span, (key >> 21) % span, bool(key >> 63)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` uint8 -> ``(B, 1, S, S)`` float32 in [0, 1]."""
        s = self.img_size
        x = x.float().div_(255.0).unsqueeze(1)  # (B, 1, h, w)
        if x.shape[-2:] != (s, s):
            # reason: antialiasing only changes a downscale; upscaled it equals plain bilinear to
            # 2e-7 and its kernel is twice as slow
            aa = s < max(x.shape[-2:])
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=aa)
        return x

    def one(self, image: torch.Tensor, key: int | None) -> torch.Tensor:
        """``image`` ``(h, w)`` uint8, ``key`` (None: no augmentation) -> ``(3, S, S)`` float32."""
        s, p = self.img_size, self.pad
        x = self._resize(image[None])[0]  # (1, S, S)
        if self.augment and key is not None:
            dx, dy, flip = self._offsets(key)
            x = F.pad(x, (p, p, p, p), value=self.pad_value)[:, dy : dy + s, dx : dx + s]  # (1, S, S)
            if flip:
                x = x.flip(-1)
        mean, std = self._mean_std
        return (x - mean) / std  # (3, S, S)

    def batch(self, images: torch.Tensor, keys: np.ndarray | None) -> torch.Tensor:
        """``images`` ``(B, h, w)`` uint8, ``keys`` ``(B,)`` uint64 or None -> ``(B, 3, S, S)`` float32."""
        s, p = self.img_size, self.pad
        x = self._resize(images)  # (B, 1, S, S)
        if self.augment and keys is not None:
            span = np.uint64(2 * p + 1)
            dx = torch.from_numpy((keys % span).astype(np.int64))  # (B,)
            dy = torch.from_numpy(((keys >> np.uint64(21)) % span).astype(np.int64))  # (B,)
            flip = torch.from_numpy((keys >> np.uint64(63)).astype(bool))  # (B,)
            x = F.pad(x, (p, p, p, p), value=self.pad_value)[:, 0]  # (B, S+2p, S+2p)
            ar = torch.arange(s)
            rows = dy[:, None] + ar  # (B, S)
            cols = dx[:, None] + torch.where(flip[:, None], s - 1 - ar, ar)  # (B, S), reversed = flip
            x = x.gather(1, rows[:, :, None].expand(-1, -1, s + 2 * p))  # (B, S, S+2p)
            x = x.gather(2, cols[:, None, :].expand(-1, s, -1)).unsqueeze(1)  # (B, 1, S, S)
        mean, std = self._mean_std
        return (x - mean) / std  # (B, 3, S, S)


class _TensorImages(AugmentedDataset):
    """Images held as one uint8 tensor (Fashion-MNIST), transformed with tensor ops."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: list[int] | None,
        transform: _TensorTransform,
        *,
        seed: int,
        files: tuple[Path, ...],
    ) -> None:
        if indices is not None:
            images, labels = images[indices], labels[indices]
        super().__init__(labels, seed=seed, augment=transform.augment)
        self.images = images  # (N, 28, 28) uint8
        self.indices = indices  # positions in the IDX split; None = all of it
        self.transform = transform
        self.files = files

    def _load(self, i: int, key: int | None) -> torch.Tensor:
        return self.transform.one(self.images[i], key)

    def get_batch(
        self, indices: Sequence[int] | torch.Tensor, view: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.view if view is None else view
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
        n = len(self)
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"sample index out of range for a dataset of {n}")
        idx = torch.where(idx < 0, idx + n, idx)
        keys = _sample_keys(self.seed, view, idx.numpy()) if self.augment else None
        return self.transform.batch(self.images[idx], keys), self.labels[idx]

    def describe(self) -> str:
        return "tensor:" + json.dumps(asdict(self.transform), sort_keys=True)

    def _listing_digest(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            h.update(_file_sha256(f).encode())
        h.update(json.dumps(self.indices).encode())
        return h.hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256_cached(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)  # reason: 50 ms per Fashion-MNIST file; keyed by size and mtime
def _file_sha256_cached(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")  # grayscale, palette and RGBA images become RGB


class _FolderImages(AugmentedDataset):
    """Image files of an ImageFolder split, transformed with timm's transforms."""

    def __init__(
        self,
        root: Path,
        samples: list[tuple[str, int]],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        seed: int,
        augment: bool,
    ) -> None:
        super().__init__(torch.tensor([y for _, y in samples], dtype=torch.int64), seed=seed, augment=augment)
        self.root = root
        self.samples = samples  # (path, class index), as torchvision's ImageFolder
        self.transform = transform
        self._seed_numpy = _uses_numpy_rng(transform)

    def _load(self, i: int, key: int | None) -> torch.Tensor:
        path = self.samples[i][0]
        try:
            img = _load_rgb(path)
        except Exception as exc:  # reason: PIL raises many types for a file that went bad after build
            raise DataError(
                f"could not read image '{path}' ({type(exc).__name__}: {exc}); remove or replace it"
            ) from exc
        if key is None:
            return self.transform(img)
        with _seeded_global_rngs(key, with_numpy=self._seed_numpy):
            return self.transform(img)

    def describe(self) -> str:
        return "timm:" + repr(self.transform)

    def _listing_digest(self) -> str:
        h = hashlib.sha256()
        for path, y in self.samples:
            st = os.stat(path)
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{y}\n".encode())
        return h.hexdigest()


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

    def fingerprint(self, split: str) -> str:
        """sha256 hex of the split's sample listing, transform and augmentation seed.

        It changes whenever the data or the transform does; it does not depend on the view.

        Args:
            split: 'train' or 'val'.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        ds = self.train if split == "train" else self.val
        h = hashlib.sha256(ds.fingerprint().encode())
        h.update(json.dumps({"source": FASHION_MNIST if self.source == FASHION_MNIST else "dir",
                             "classes": list(self.classes)}).encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------


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


def _val_count(limit: int, num_classes: int) -> int:
    return max(limit // 4, num_classes)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# ---------------------------------------------------------------------------------------------


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):  # uncompressed first: faster to read
        if (folder / name).is_file():
            return folder / name
    return None


def _has_idx(folder: Path) -> bool:
    return all(_find_idx(folder, stem) for pair in _IDX_FILES.values() for stem in pair)


def _fashion_dir(root: str | None) -> Path:
    """The folder with the four IDX files: `root`, else $FXDROP_DATA, else the system copy, else a
    download into ~/.cache/fxdrop."""
    explicit = root if root is not None else os.environ.get("FXDROP_DATA") or None
    if explicit is not None:
        folder = Path(explicit).expanduser()
        if _has_idx(folder):
            return folder
        raise DataError(
            f"Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...) not found in '{folder}'; {_OFFLINE_HINT}"
        )
    system = Path(_SYSTEM_FASHION_DIR)
    if _has_idx(system):
        return system
    cache_root = Path.home() / ".cache" / "fxdrop"
    raw = cache_root / "FashionMNIST" / "raw"  # where torchvision's FashionMNIST puts the files
    if _has_idx(raw):
        return raw
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache_root), train=True, download=True)
    except Exception as exc:  # reason: offline failures surface as URLError, RuntimeError, OSError, ...
        raise DataError(
            f"Fashion-MNIST not found in '{system}' and the download to '{cache_root}' failed "
            f"({type(exc).__name__}); {_OFFLINE_HINT}"
        ) from exc
    if not _has_idx(raw):
        raise DataError(f"Fashion-MNIST download left no IDX files in '{raw}'; {_OFFLINE_HINT}")
    return raw


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor of its stored shape. Shared: do not modify."""
    st = path.stat()
    return _read_idx_cached(path, st.st_size, st.st_mtime_ns, ndim)


# reason: a process often builds the data more than once (train then evaluate, a policy sweep,
# tests); the four files take 0.5 s to decode and 55 MB to keep. Keyed by size and mtime.
@lru_cache(maxsize=4)
def _read_idx_cached(path: Path, size: int, mtime_ns: int, ndim: int) -> torch.Tensor:
    buf = path.read_bytes()
    try:
        if path.suffix == ".gz":
            buf = zlib.decompress(buf, 31)  # 31: gzip container
        zero, dtype_code, nd = struct.unpack(">HBB", buf[:4])
        if zero != 0 or dtype_code != 0x08 or nd != ndim:
            raise ValueError(f"header says dtype 0x{dtype_code:02x}, {nd} dims; expected 0x08, {ndim} dims")
        dims = struct.unpack(f">{nd}I", buf[4 : 4 + 4 * nd])
        if len(buf) - 4 - 4 * nd != int(np.prod(dims)):
            raise ValueError(f"{len(buf) - 4 - 4 * nd} data bytes for shape {dims}")
    except (zlib.error, struct.error, ValueError) as exc:
        raise DataError(
            f"'{path}' is not a valid IDX file ({exc}); reinstall it (apt-get install --reinstall "
            "dataset-fashion-mnist) or point FXDROP_DATA at good files"
        ) from exc
    data = bytearray(memoryview(buf)[4 + 4 * nd :])  # writable copy, so torch owns plain memory
    return torch.frombuffer(data, dtype=torch.uint8).view(*dims)


def _idx_paths(folder: Path, split: str) -> tuple[Path, Path]:
    img_stem, lbl_stem = _IDX_FILES[split]
    img, lbl = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
    assert img is not None and lbl is not None  # _fashion_dir checked all four
    return img, lbl


def _load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_path, lbl_path = _idx_paths(folder, split)
    images = _read_idx(img_path, 3)  # (N, 28, 28) uint8
    labels = _read_idx(lbl_path, 1).to(torch.int64)  # (N,)
    if len(images) != len(labels):
        raise DataError(
            f"'{img_path}' holds {len(images)} images but '{lbl_path}' {len(labels)} labels; "
            "reinstall dataset-fashion-mnist or point FXDROP_DATA at a matching pair"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"'{lbl_path}' has label {int(labels.max())}, Fashion-MNIST has 10 classes; check the file")
    return images, labels


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one Fashion-MNIST split from its IDX files (gzipped or not).

    The files are looked for in ``root``, else ``$FXDROP_DATA``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), else in
    ``~/.cache/fxdrop``, where torchvision downloads them when online.

    Args:
        split: 'train' (60,000 images) or 'test' (10,000 images).
        root: folder with the IDX files.

    Returns:
        ``images`` ``(N, 28, 28)`` uint8 and ``labels`` ``(N,)`` int64.

    Example:
        >>> x, y = load_fashion_mnist("test")
        >>> x.shape, y[:3].tolist()
        (torch.Size([10000, 28, 28]), [9, 2, 1])
    """
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    images, labels = _load_split(_fashion_dir(root), split)
    return images.clone(), labels  # the decoded images are cached and shared; the caller may modify these


def _mean_std(model: nn.Module | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if model is None:
        return _IMAGENET_MEAN, _IMAGENET_STD
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)  # ImageNet mean/std when the model has no config
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    if len(mean) == 1:  # a single-channel config: the same statistics on all three channels
        mean, std = mean * 3, std * 3
    return mean, std


def _build_fashion(
    img_size: int, model: nn.Module | None, limit: int | None, seed: int, augment: bool
) -> DataBundle:
    folder = _fashion_dir(None)
    mean, std = _mean_std(model)
    base = _TensorTransform(img_size, mean, std, augment=False)
    train_tf = _TensorTransform(img_size, mean, std, augment=augment, pad=img_size // 8)
    with ThreadPoolExecutor(2) as pool:  # reason: zlib releases the GIL; both splits decode at once
        loaded = dict(zip(("train", "test"), pool.map(lambda sp: _load_split(folder, sp), ("train", "test"))))
    parts = {}
    for split, tf in (("train", train_tf), ("test", base)):
        images, labels = loaded[split]
        indices = None
        if limit is not None:
            n = limit if split == "train" else _val_count(limit, len(FASHION_MNIST_CLASSES))
            indices = class_balanced_indices(labels, n, seed) if n < len(labels) else None
        parts[split] = _TensorImages(images, labels, indices, tf, seed=seed, files=_idx_paths(folder, split))
    return DataBundle(parts["train"], parts["test"], FASHION_MNIST_CLASSES, FASHION_MNIST, 0)


def export_fashion_mnist(out_dir: str, limit: int | None = None) -> dict:
    """Write Fashion-MNIST as an ImageFolder tree of PNG files.

    ``out_dir/train/<class>/<index>.png`` from the train split and ``out_dir/val/<class>/<index>.png``
    from the test split, where ``<index>`` is the image's position in its IDX file. With ``limit``
    the subsets are those ``build_data('fashion-mnist', ..., limit=limit, seed=0)`` uses. The tree
    is written under a temporary name and renamed into place.

    Args:
        out_dir: where to write; must not exist or be empty.
        limit: class-balanced number of train images; val gets ``max(limit // 4, 10)``.
            None exports all 60,000 + 10,000.

    Returns:
        ``{"dir": out_dir, "train": n, "val": m, "per_class": {"train": {class: n}, "val": {...}}}``.

    Example:
        >>> export_fashion_mnist("fmnist-small", limit=1000)["train"]
        1000
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"'{out}' already exists and is not empty; remove it or choose another output directory")
    folder = _fashion_dir(None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    result: dict = {"dir": str(out), "per_class": {}}
    try:
        for split, name in (("train", "train"), ("test", "val")):
            images, labels = _load_split(folder, split)
            if limit is None:
                indices = list(range(len(labels)))
            else:
                n = limit if split == "train" else _val_count(limit, len(FASHION_MNIST_CLASSES))
                indices = class_balanced_indices(labels, n, 0)
            counts = dict.fromkeys(FASHION_MNIST_CLASSES, 0)
            for cls in FASHION_MNIST_CLASSES:
                (tmp / name / cls).mkdir(parents=True)
            arr, lbl = images.numpy(), labels.tolist()
            for j in indices:
                cls = FASHION_MNIST_CLASSES[lbl[j]]
                Image.fromarray(arr[j]).save(tmp / name / cls / f"{j:05d}.png")  # 'L' (grayscale) PNG
                counts[cls] += 1
            result[name] = len(indices)
            result["per_class"][name] = counts
        os.replace(tmp, out)  # an empty out_dir is replaced as well
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# ---------------------------------------------------------------------------------------------
# ImageFolder directories
# ---------------------------------------------------------------------------------------------


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # reason: PIL raises OSError, SyntaxError, ValueError, ... for corrupt files
        return False


def _scan_split(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not split_dir.is_dir():
        raise DataError(
            f"'{split_dir}' is missing; a data directory needs train/<class>/* and val/<class>/* "
            "(export_fashion_mnist writes one)"
        )
    try:
        folder = ImageFolder(str(split_dir), allow_empty=True)
    except FileNotFoundError as exc:  # no class folder at all
        raise DataError(f"'{split_dir}' has no class folders; put the images in {split_dir}/<class>/") from exc
    counts = [0] * len(folder.classes)
    for _, y in folder.samples:
        counts[y] += 1
    empty = [c for c, n in zip(folder.classes, counts) if n == 0]
    if empty:
        exts = " ".join(IMG_EXTENSIONS)
        raise DataError(
            f"'{split_dir}': class folder(s) {', '.join(empty)} hold no images ({exts}); "
            "add images or remove the empty folders"
        )
    return list(folder.classes), list(folder.samples)


def _verified(
    samples: list[tuple[str, int]], n: int | None, seed: int, verdict: dict[str, bool]
) -> list[tuple[str, int]]:
    """A class-balanced subset of ``n`` readable samples (all readable ones when n is None);
    unreadable files are replaced by other samples of the pool."""
    pool = samples
    while True:
        if n is None or n >= len(pool):
            chosen = pool
        else:
            chosen = [pool[k] for k in class_balanced_indices([y for _, y in pool], n, seed)]
        for path, _ in chosen:
            if path not in verdict:
                verdict[path] = _readable(path)
        bad = {p for p, _ in chosen if not verdict[p]}
        if not bad:
            return chosen
        pool = [s for s in pool if s[0] not in bad]


def _build_folder(
    data: str, img_size: int, model: nn.Module | None, limit: int | None, seed: int, augment: bool
) -> DataBundle:
    from timm.data import create_transform, resolve_data_config

    root = Path(data).expanduser().absolute()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(
            f"data directory '{root}' {what}; pass 'fashion-mnist' or a directory with "
            "train/<class>/* and val/<class>/*"
        )
    train_classes, train_samples = _scan_split(root / "train")
    val_classes, val_samples = _scan_split(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"'{root}': train/ and val/ have different classes (only in train: {only_train or 'none'}; "
            f"only in val: {only_val or 'none'}); give both the same class folders"
        )
    verdict: dict[str, bool] = {}
    n_val = None if limit is None else _val_count(limit, len(train_classes))
    train_samples = _verified(train_samples, limit, seed, verdict)
    val_samples = _verified(val_samples, n_val, seed, verdict)
    for split, samples in (("train", train_samples), ("val", val_samples)):
        if not samples:
            raise DataError(f"'{root / split}' has no readable images; check the files or replace them")

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    train_tf = create_transform(**cfg, is_training=augment)
    val_tf = create_transform(**cfg, is_training=False)
    return DataBundle(
        train=_FolderImages(root, train_samples, train_tf, seed=seed, augment=augment),
        val=_FolderImages(root, val_samples, val_tf, seed=seed, augment=False),
        classes=tuple(train_classes),
        source=str(root),
        skipped=sum(not ok for ok in verdict.values()),
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def build_data(
    data: str,
    img_size: int,
    *,
    model: nn.Module | None = None,
    limit: int | None = None,
    seed: int = 0,
    augment: bool = True,
) -> DataBundle:
    """Train and validation datasets for ``data``.

    ``'fashion-mnist'`` reads the IDX files (see :func:`load_fashion_mnist`); train is the
    60,000-image split, val the 10,000-image test split. Images become 3-channel, bilinear-resized
    (antialiased when shrinking) to ``img_size``, normalised with the model's mean/std (timm's data
    config; ImageNet without a model); train augmentation is a random crop with ``img_size // 8`` zero padding and a
    horizontal flip, all with tensor ops.

    Any other value is a directory ``DIR/train/<class>/*``, ``DIR/val/<class>/*`` read with
    torchvision's ImageFolder and timm's ``create_transform`` (its training transform for train when
    ``augment``). Every image used is verified once here; unreadable ones are skipped and counted in
    ``skipped`` (with ``limit``, only the images considered for the subset are checked).

    Args:
        data: 'fashion-mnist' or an ImageFolder directory.
        img_size: side of the square model input in pixels.
        model: whose data config (mean, std, interpolation, crop) to use.
        limit: class-balanced number of train samples; val then gets ``max(limit // 4, classes)``.
        seed: seeds the augmentation and the subset.
        augment: randomly augment train samples (per seed, view and index).

    Returns:
        A :class:`DataBundle`.

    Example:
        >>> b = build_data("fashion-mnist", 32, limit=1000)
        >>> x, y = b.train[0]; x.shape, len(b.train), len(b.val)
        (torch.Size([3, 32, 32]), 1000, 250)
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {img_size!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of samples, got {limit}")
    if data == FASHION_MNIST:
        return _build_fashion(img_size, model, limit, seed, augment)
    return _build_folder(data, img_size, model, limit, seed, augment)
