"""ImageFolder trees (`DIR/train/<class>/*`, `DIR/val/<class>/*`) read with torchvision's
ImageFolder and timm's transforms; unreadable images are skipped and counted."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import DataError
from ..messages import Entry
from .datasets import AugmentedDataset, DataBundle, _val_count, class_balanced_indices
from .file_facts import FileFacts
from .keys import _seeded_global_rngs, _uses_numpy_rng

# 16-bit grayscale PNGs open as I;16 (or I in older Pillow); their values span 0..65535
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        if im.mode in _WIDE_MODES:
            # convert("RGB") clips 16- and 32-bit values at 255, a white image; 16-bit
            # samples map onto 8 bits by their full range (65535 -> 255), as image viewers show them
            wide = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
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
        facts: FileFacts | None = None,
    ) -> None:
        super().__init__(torch.tensor([y for _, y in samples], dtype=torch.int64), seed=seed, augment=augment)
        self.root = root
        self.facts = facts or FileFacts(root)  # content hashes remembered between runs
        self.samples = samples  # (path, class index), as torchvision's ImageFolder
        self.transform = transform
        self._seed_numpy = _uses_numpy_rng(transform)

    def _load(self, i: int, key: int | None) -> torch.Tensor:
        path = self.samples[i][0]
        try:
            img = _load_rgb(path)
        except Exception as exc:  # PIL raises many types for a file that went bad after build
            raise DataError(
                f"could not read image '{path}' ({type(exc).__name__}: {exc}); remove or replace it"
            ) from exc
        if key is None:
            return self.transform(img)
        with _seeded_global_rngs(key, with_numpy=self._seed_numpy):
            return self.transform(img)

    def describe(self) -> str:
        return "timm:" + repr(self.transform)

    def sample_ids(self) -> list[str]:
        # the class folder is part of the path, so a relabelled image is a new sample
        ids = [
            f"{os.path.relpath(path, self.root)}\t{_content_sha256(path, self.facts)}"
            for path, _ in self.samples
        ]
        self.facts.save()
        return ids

    def _listing_digest(self) -> str:
        h = hashlib.sha256()
        for path, y in self.samples:
            st = os.stat(path)
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{y}\n".encode())
        return h.hexdigest()


def _content_sha256(path: str, facts: FileFacts) -> str:
    try:
        return facts.sha256(path)
    except OSError as exc:
        raise DataError(f"could not read image '{path}' ({exc.strerror}); remove or replace it") from exc


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.load()  # decode it all; verify() passes truncated files that fail later
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for corrupt files
        return False


def folder_image_size(data: str, probes: int = 32) -> int | None:
    """The shorter side, in pixels, of the training images of the folder `data` (the median of up
    to `probes` of them, spread over the classes; headers only); None if none can be read."""
    train = Path(data).expanduser() / "train"
    if not train.is_dir():
        return None
    files = sorted(p for p in train.glob("*/*") if p.is_file())
    sides = []
    for path in files[:: max(1, len(files) // probes)][:probes]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # an unreadable file is skipped later, with the others
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def _scan_split(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not split_dir.is_dir():
        raise DataError(
            "'{split_dir}' is missing; a data directory needs train/<class>/* and val/<class>/* "
            "({export} writes one)",
            split_dir=split_dir,
            export=Entry("data.export_fashion_mnist", command="data export fashion-mnist DIR"),
        )
    try:
        folder = ImageFolder(str(split_dir), allow_empty=True)
    except FileNotFoundError as exc:  # no class folder at all
        raise DataError(
            f"'{split_dir}' has no class folders; put the images in {split_dir}/<class>/"
        ) from exc
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
    samples: list[tuple[str, int]], n: int | None, seed: int, verdict: dict[str, bool], facts: FileFacts
) -> list[tuple[str, int]]:
    """A class-balanced subset of ``n`` readable samples (all readable ones when n is None);
    unreadable files are replaced by other samples of the pool. Whether a file decodes is
    remembered in `facts` (a file is decoded again only when it changed)."""
    pool = samples
    while True:
        if n is None or n >= len(pool):
            chosen = pool
        else:
            chosen = [pool[k] for k in class_balanced_indices([y for _, y in pool], n, seed)]
        for path, _ in chosen:
            if path not in verdict:
                verdict[path] = facts.readable(path, _readable)
        bad = {p for p, _ in chosen if not verdict[p]}
        if not bad:
            return chosen
        pool = [s for s in pool if s[0] not in bad]


def _build_folder(
    data: str,
    img_size: int,
    model: nn.Module | None,
    limit: int | None,
    seed: int,
    augment: bool,
    classes: tuple[str, ...] | None = None,
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
    if classes is not None:
        if set(classes) != set(train_classes):
            raise DataError(
                f"'{root}' has the classes {train_classes}, but {list(classes)} were asked for; "
                "give the same class folders"
            )
        # labels follow the given order (a run's), whatever order the folder lists them in
        order = {name: k for k, name in enumerate(classes)}
        relabel = [order[name] for name in train_classes]
        train_samples = [(path, relabel[y]) for path, y in train_samples]
        val_samples = [(path, relabel[y]) for path, y in val_samples]
        train_classes = list(classes)
    verdict: dict[str, bool] = {}
    facts = FileFacts(root)
    n_val = None if limit is None else _val_count(limit, len(train_classes))
    train_samples = _verified(train_samples, limit, seed, verdict, facts)
    val_samples = _verified(val_samples, n_val, seed, verdict, facts)
    facts.save()
    for split, samples in (("train", train_samples), ("val", val_samples)):
        if not samples:
            raise DataError(f"'{root / split}' has no readable images; check the files or replace them")

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    train_tf = create_transform(**cfg, is_training=augment)
    val_tf = create_transform(**cfg, is_training=False)
    return DataBundle(
        train=_FolderImages(root, train_samples, train_tf, seed=seed, augment=augment, facts=facts),
        val=_FolderImages(root, val_samples, val_tf, seed=seed, augment=False, facts=facts),
        classes=tuple(train_classes),
        source=str(root),
        skipped=sum(not ok for ok in verdict.values()),
    )
