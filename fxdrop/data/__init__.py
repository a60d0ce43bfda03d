"""Training data: Fashion-MNIST from its IDX files or an ImageFolder tree, as datasets whose random
augmentation is a pure function of (seed, view, sample index). `build_data` is the one entry the
engine and the CLI call.

    keys.py           per-sample random keys and seeded global RNGs
    datasets.py       the dataset base class, the bundle, class-balanced subsets
    fashion_mnist.py  the IDX files, tensor transforms, export as an image tree
    folder.py         ImageFolder trees with timm's transforms
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import DataError
from .datasets import AugmentedDataset, DataBundle, class_balanced_indices
from .fashion_mnist import (
    FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    _build_fashion,
    export_fashion_mnist,
    fashion_subset,
    load_fashion_mnist,
)
from .folder import _build_folder, folder_image_size

__all__ = [
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "AugmentedDataset",
    "DataBundle",
    "build_data",
    "is_fashion_mnist",
    "load_fashion_mnist",
    "export_fashion_mnist",
    "class_balanced_indices",
    "folder_image_size",
]


def is_fashion_mnist(data: str) -> bool:
    """Whether `data` names the built-in Fashion-MNIST (all of it, or `fashion-mnist:CLASSES`)."""
    return data == FASHION_MNIST or data.startswith(FASHION_MNIST + ":")


def build_data(
    data: str,
    img_size: int,
    *,
    model: nn.Module | None = None,
    limit: int | None = None,
    seed: int = 0,
    augment: bool = True,
    classes: Sequence[str] | None = None,
) -> DataBundle:
    """Train and validation datasets for ``data``.

    ``'fashion-mnist'`` reads the IDX files (see :func:`load_fashion_mnist`);
    ``'fashion-mnist:0-4'`` (or ``:5,7,9``) only those classes, relabelled from 0 in that order. Train is the
    60,000-image split, val the 10,000-image test split. Images become 3-channel, bilinear-resized
    (antialiased when shrinking) to ``img_size``, normalised with the model's mean/std (timm's data
    config; ImageNet without a model); train augmentation is a random crop with ``img_size // 8`` zero padding and a
    horizontal flip, all with tensor ops.

    Any other value is a directory ``DIR/train/<class>/*``, ``DIR/val/<class>/*`` read with
    torchvision's ImageFolder and timm's ``create_transform`` (its training transform for train when
    ``augment``). Every image used is verified once here; unreadable ones are skipped and counted in
    ``skipped`` (with ``limit``, only the images considered for the subset are checked).

    Args:
        data: 'fashion-mnist', 'fashion-mnist:CLASSES' or an ImageFolder directory.
        img_size: side of the square model input in pixels.
        model: whose data config (mean, std, interpolation, crop) to use.
        limit: class-balanced number of train samples; val then gets ``max(limit // 4, classes)``.
        seed: seeds the augmentation and the subset.
        augment: randomly augment train samples (per seed, view and index).
        classes: the class names in label order (a run's): a folder must hold exactly these
            classes, in any order; its labels follow this order. None: the folder's sorted order.

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
    if is_fashion_mnist(data):
        subset = fashion_subset(data)
        own = FASHION_MNIST_CLASSES if subset is None else tuple(FASHION_MNIST_CLASSES[c] for c in subset)
        if classes is not None and tuple(classes) != own:
            raise DataError(
                f"{data} has the classes {list(own)}, in this order; {list(classes)} were asked for"
            )
        return _build_fashion(img_size, model, limit, seed, augment, subset)
    return _build_folder(
        data, img_size, model, limit, seed, augment, None if classes is None else tuple(classes)
    )
