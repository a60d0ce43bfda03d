"""`fashion-mnist:CLASSES`: the built-in data, some of its classes (a backbone's and a fine-tune's)."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_fmnist

from fxdrop.data import build_data, load_fashion_mnist
from fxdrop.errors import DataError

pytestmark = needs_fmnist


def test_a_class_subset_holds_exactly_those_classes_relabelled_in_the_specs_order():
    b = build_data("fashion-mnist:7,5,9", 32, limit=600, seed=0, augment=False)
    assert b.classes == ("Sneaker", "Sandal", "Ankle boot") and b.source == "fashion-mnist:7,5,9"
    assert len(b.train) == 600 and len(b.val) == 150
    _, raw = load_fashion_mnist("train")
    for ds, split in ((b.train, "train"), (b.val, "test")):
        original = load_fashion_mnist(split)[1][torch.tensor(ds.indices)]
        labels = torch.tensor([ds[i][1] for i in range(len(ds))])
        # each sample's new label is its original class's place in the spec
        assert torch.equal(torch.tensor([7, 5, 9])[labels], original)
        assert torch.bincount(labels).tolist() == [len(ds) // 3] * 3  # class-balanced
    whole = build_data("fashion-mnist:0-4", 32, augment=False)
    assert len(whole.train) == int((raw < 5).sum()) == 30000


@pytest.mark.parametrize(
    "spec",
    ["fashion-mnist:", "fashion-mnist:3", "fashion-mnist:0-10", "fashion-mnist:1,1", "fashion-mnist:a-b"],
)
def test_a_spec_that_names_no_subset_is_one_clear_error(spec):
    with pytest.raises(DataError, match="fashion-mnist:FIRST-LAST"):
        build_data(spec, 32, limit=100)
