"""Fashion-MNIST from its IDX files (the Debian package `dataset-fashion-mnist`), as tensor
datasets transformed with tensor ops, and its export as an ImageFolder tree."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .._io import sha256_file
from ..errors import DataError
from ..records import Exported
from .datasets import (
    AugmentedDataset,
    DataBundle,
    _mean_std,
    _val_count,
    class_balanced_indices,
)

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


@dataclass(frozen=True)
class _TensorTransform:
    """Tensor-op transform of uint8 grayscale images: resize, augment, 3 channels, normalise.

    The augmentation of a sample is read from its 64-bit key: the crop offsets from bits 0-20 and
    21-41, a horizontal flip (probability 1/2) from bit 63.
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
            # antialiasing only changes a downscale; upscaled it equals plain bilinear to
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

    def describe(self) -> str:
        return "tensor:" + json.dumps(asdict(self.transform), sort_keys=True)

    def sample_ids(self) -> list[str]:
        source = "+".join(f"{f.name}:{_file_sha256(f)[:16]}" for f in self.files)
        positions = self.indices if self.indices is not None else range(len(self))
        return [f"{source}#{i}" for i in positions]

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


@lru_cache(maxsize=8)  # hashing a file again per build adds up; keyed by size and mtime
def _file_sha256_cached(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


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
    except Exception as exc:  # offline failures surface as URLError, RuntimeError, OSError, ...
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


# a process often builds the data more than once (train then evaluate, a policy sweep,
# tests); decoding the four files costs more than keeping them. Keyed by size and mtime.
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
        raise DataError(
            f"'{lbl_path}' has label {int(labels.max())}, Fashion-MNIST has 10 classes; check the file"
        )
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


def fashion_subset(data: str) -> tuple[int, ...] | None:
    """The classes a Fashion-MNIST spec names: `fashion-mnist` all (None), `fashion-mnist:0-4`
    or `fashion-mnist:5,7,9` those labels, in that order (relabelled from 0). Raises DataError for
    a spec it cannot read."""
    if data == FASHION_MNIST:
        return None
    text = data[len(FASHION_MNIST) + 1 :]
    try:
        picked: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            picked += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        picked = []
    n = len(FASHION_MNIST_CLASSES)
    if (
        not picked
        or len(set(picked)) != len(picked)
        or not all(0 <= c < n for c in picked)
        or len(picked) < 2
    ):
        raise DataError(
            f"'{data}' names no class subset of Fashion-MNIST; write fashion-mnist:FIRST-LAST or "
            f"fashion-mnist:A,B,C with two or more distinct labels from 0 to {n - 1}"
        )
    return tuple(picked)


def _build_fashion(
    img_size: int,
    model: nn.Module | None,
    limit: int | None,
    seed: int,
    augment: bool,
    subset: tuple[int, ...] | None = None,
) -> DataBundle:
    folder = _fashion_dir(None)
    mean, std = _mean_std(model)
    base = _TensorTransform(img_size, mean, std, augment=False)
    train_tf = _TensorTransform(img_size, mean, std, augment=augment, pad=img_size // 8)
    with ThreadPoolExecutor(2) as pool:  # zlib releases the GIL; both splits decode at once
        loaded = dict(zip(("train", "test"), pool.map(lambda sp: _load_split(folder, sp), ("train", "test"))))
    classes = FASHION_MNIST_CLASSES if subset is None else tuple(FASHION_MNIST_CLASSES[c] for c in subset)
    parts = {}
    for split, tf in (("train", train_tf), ("test", base)):
        images, labels = loaded[split]
        indices = None
        if subset is not None:  # relabelled 0..k-1 in the spec's order; other classes left out (-1)
            remap = torch.full((len(FASHION_MNIST_CLASSES),), -1, dtype=labels.dtype)
            remap[list(subset)] = torch.arange(len(subset), dtype=labels.dtype)
            labels = remap[labels]
            indices = (labels >= 0).nonzero().flatten().tolist()
        if limit is not None:
            n = limit if split == "train" else _val_count(limit, len(classes))
            pool = labels if indices is None else labels[indices]
            if n < len(pool):
                chosen = class_balanced_indices(pool, n, seed)
                indices = chosen if indices is None else [indices[j] for j in chosen]
        parts[split] = _TensorImages(images, labels, indices, tf, seed=seed, files=_idx_paths(folder, split))
    source = FASHION_MNIST if subset is None else f"{FASHION_MNIST}:{','.join(map(str, subset))}"
    return DataBundle(parts["train"], parts["test"], classes, source, 0)


def export_fashion_mnist(out_dir: str, limit: int | None = None) -> Exported:
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
        What was written: the folder, the images per split and per class and split.

    Example:
        >>> export_fashion_mnist("fmnist-small", limit=1000).train
        1000
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"'{out}' already exists and is not empty; remove it or choose another output directory"
        )
    folder = _fashion_dir(None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    written, per_class = {}, {}  # per split: images, and images per class
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
            written[name], per_class[name] = len(indices), counts
        os.replace(tmp, out)  # an empty out_dir is replaced as well
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(str(out), written["train"], written["val"], per_class)
