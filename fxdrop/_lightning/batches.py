"""The user's batches inside `LayerDropping`: where a sample keeps its image and label (a pair
or a dict, `batch_keys`), the datasets as the Dropper reads them, and the Dropper's feed as a
loader a Trainer iterates, its batches in the user's structure."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from ..engine.dropper import Dropper
from ..errors import ConfigError

# a dict sample's image and label keys when `batch_keys` is not given: the first of each present
IMAGE_KEYS = ("image", "img", "pixel_values", "input", "x")
LABEL_KEYS = ("label", "labels", "target", "y")


@dataclass(frozen=True)
class _BatchShape:
    """Where a sample (and a batch) keeps its image and label: positions of a pair (`keys` None)
    or keys of a dict (`keys`: all of them, in order)."""

    image: str | int
    label: str | int
    keys: tuple[str, ...] | None

    @classmethod
    def of(cls, loader: Any, name: str, batch_keys: tuple[str | int, str | int] | None) -> _BatchShape:
        """The structure of `loader`'s samples, or a ConfigError that says how to make it one
        LayerDropping trains from."""
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or len(dataset) == 0:
            raise ConfigError(name, "is not a DataLoader over a non-empty dataset; LayerDropping needs one")
        if getattr(loader, "collate_fn", default_collate) is not default_collate:
            raise ConfigError(
                name,
                "has its own collate_fn, which LayerDropping cannot apply (it batches the dataset's "
                "samples itself): do that work in the dataset and leave collate_fn unset",
            )
        sample = dataset[0]
        if isinstance(sample, Mapping):
            keys = tuple(sample)
            image, label = batch_keys or (
                next((k for k in IMAGE_KEYS if k in sample), None),
                next((k for k in LABEL_KEYS if k in sample), None),
            )
            if image not in sample or label not in sample:
                raise ConfigError(
                    "batch_keys",
                    f"does not name the image and label of {name}'s dict samples (keys {list(keys)}); "
                    'name them: LayerDropping(batch_keys=("IMAGE_KEY", "LABEL_KEY"))',
                )
            if len(keys) > 2:
                extra = [k for k in keys if k not in (image, label)]
                raise ConfigError(
                    "batch_keys",
                    f"{name}'s samples also hold {extra}, which a batch from the cache cannot carry; "
                    f"make the dataset return only {image!r} and {label!r}",
                )
            shape = cls(image, label, keys)
        elif isinstance(sample, Sequence) and not isinstance(sample, str) and len(sample) == 2:
            image, label = batch_keys or (0, 1)
            if {image, label} != {0, 1}:
                raise ConfigError(
                    "batch_keys", f"must be positions (0, 1) or (1, 0) for {name}'s pair samples"
                )
            shape = cls(image, label, None)
        else:
            raise ConfigError(
                "batch_keys",
                f"{name}'s samples are {type(sample).__name__}"
                f"{f' of {len(sample)}' if isinstance(sample, Sequence) else ''}; LayerDropping trains "
                "from (image, label) pairs or {image: ..., label: ...} dicts: make the dataset return one",
            )
        if not isinstance(sample[shape.image], torch.Tensor):
            raise ConfigError(
                "batch_keys",
                f"the image ({shape.image!r}) of {name}'s samples is a {type(sample[shape.image]).__name__}, "
                "not a tensor; give the dataset a transform that makes tensors",
            )
        return shape

    def pairs(self, dataset: Dataset) -> Dataset:
        """`dataset` as the Dropper reads it: `(image, label)` samples."""
        return dataset if (self.keys, self.image) == (None, 0) else _Pairs(dataset, self.image, self.label)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor] | dict[str, torch.Tensor]:
        """A batch as the user's loader makes it (default_collate: a list for pairs), `x` the image."""
        if self.keys is None:
            return [x, y] if self.image == 0 else [y, x]
        return {k: x if k == self.image else y for k in self.keys}


class _Pairs(Dataset):
    """A dataset whose samples name their image and label, as `(image, label)` samples; anything
    else (keys, recipe, views) is the dataset's."""

    def __init__(self, inner: Dataset, image: str | int, label: str | int) -> None:
        self.inner, self.image, self.label = inner, image, label

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        sample = self.inner[i]
        return sample[self.image], sample[self.label]

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)


class _FeedLoader:
    """The Dropper's feed as a loader a Trainer iterates: each pass asks the feed of the moment,
    and hands its batches over in the user's batch structure."""

    def __init__(self, dropper: Dropper, split: str, trainer: pl.Trainer, shape: _BatchShape) -> None:
        self.dropper, self.split, self.trainer, self.shape = dropper, split, trainer, shape
        self.length = dropper.images.batch_count(split)
        self.passes: weakref.WeakSet = weakref.WeakSet()  # the passes not yet finished

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        batches = self._pass()
        self.passes.add(batches)
        return batches

    def _pass(self) -> Iterator[Any]:
        feed = self.dropper.feed
        if self.split == "val":
            batches = feed.val_batches()
        else:
            epoch = self.trainer.current_epoch
            batches = feed.train_batches(self.dropper.epoch_order(epoch), epoch)
        try:
            for x, y in batches:
                yield self.shape.batch(x, y)
        finally:
            batches.close()

    def close(self) -> None:
        for batches in list(self.passes):
            batches.close()
