"""The README's own-loop example runs as written, and cached activations are what the prefix computes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import DropAfterObservations, needs_fmnist, randomize_bn

import fxdrop
from fxdrop.data import build_data

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = needs_fmnist


def test_readme_own_loop_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"<!-- own-loop[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README own-loop", "exec"), scope)  # noqa: S102 (the documented example)
    assert scope["train"].views == 2 and len(scope["train"]) == 512
    assert (tmp_path / "own-cache" / "train" / "manifest.json").exists()
    assert not any(p.requires_grad for p in scope["prefix"].parameters())


def test_cached_activations_equal_the_prefix_and_are_reused(tmp_path):
    from test_fit import small_cnn

    data = build_data("fashion-mnist", 16, limit=64, seed=0, augment=False)
    model = small_cnn(10).eval()
    prefix, _ = fxdrop.trace(model, torch.randn(2, 3, 16, 16)).split(4)
    cached = fxdrop.cache_activations(prefix, data.train, tmp_path / "c", batch_size=16)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    with torch.no_grad():
        direct = prefix(images)
    # reason: fp32; batches of 16 here vs one batch of 64 may sum convolutions in another order
    torch.testing.assert_close(
        torch.stack([cached[i][0] for i in range(len(cached))]), direct, rtol=1e-5, atol=1e-6
    )
    assert [cached[i][1] for i in range(len(cached))] == [data.train[i][1] for i in range(len(cached))]
    mtime = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    again = fxdrop.cache_activations(prefix, data.train, tmp_path / "c", batch_size=16)
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns == mtime and len(again) == len(cached)
    with pytest.raises(fxdrop.ConfigError, match="dtype"):
        fxdrop.cache_activations(prefix, data.train, tmp_path / "d", dtype="fp64")


def test_readme_dropper_loop_runs(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"<!-- dropper-loop[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README dropper-loop", "exec"), scope)  # noqa: S102 (the documented example)
    dropper, model, opt, record = scope["dropper"], scope["model"], scope["opt"], scope["record"]
    layer2 = dropper.dg.cut_point("layer2").index
    # dropped as the policy says: after layer2, at the start of the third epoch (numbered from 1)
    assert [(e.epoch, e.cut, e.module) for e in dropper.events] == [(3, layer2, "layer2")]
    assert record.epoch == 4 and record.cut_module == "layer2" and record.val_acc is not None
    assert all(st.cached for st in record.stretches)  # the last epoch trained from the cache
    # the optimizer holds exactly the parameters that still train; the prefix's are frozen
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad} and held
    prefix_params = dict(dropper.dg.split(layer2)[0].named_parameters())
    assert prefix_params and not any(p.requires_grad for p in prefix_params.values())
    assert not dropper.feeds.store.root.exists()  # the temporary cache folder went with close()


def _own_loop(bundle, policy, **config):
    """A loop of one's own (SGD, three epochs, `policy` drops after segment 4): the trained model,
    the Dropper, and the prefix's state right after the drop."""
    from test_fit import small_cnn

    model = small_cnn(len(bundle.classes))
    randomize_bn(model)
    cfg = {"epochs": 3, "batch_size": 32, "seed": 0} | config
    dropper = fxdrop.Dropper.create(model, bundle.train, bundle.val, policy=policy, **cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(0)  # the dropout masks: the same in both runs
    at_drop = None
    for epoch in range(3):
        for x, y in dropper.batches(epoch, [opt]):
            if at_drop is None and dropper.cut >= 0:
                at_drop = {k: v.clone() for k, v in model.state_dict().items()}
            loss = torch.nn.functional.cross_entropy(dropper.module(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dropper.stepped(loss)
        dropper.end_epoch()
    dropper.close()
    return model, dropper, at_drop


@pytest.mark.parametrize(
    "policy, drop_epoch, stretches",
    [
        # at the start of epoch 1 (numbered 2), landed over epoch 0
        (fxdrop.Fixed(4, 1), 2, [[(-1, False)], [(4, True)], [(4, True)]]),
        # after the second observation (a quarter epoch each): mid-epoch 0, which goes on from the cache
        (DropAfterObservations(4, 2), 1, [[(-1, False), (4, True)], [(4, True)], [(4, True)]]),
    ],
    ids=["at-epoch-start", "mid-epoch"],
)
def test_own_loop_trains_the_same_from_the_cache_as_freeze_only(policy, drop_epoch, stretches):
    data = build_data("fashion-mnist", 16, limit=256, seed=0)
    cached, d_cached, at_drop = _own_loop(data, policy, cache_dtype="fp32")
    frozen, d_frozen, _ = _own_loop(data, policy, cache=False)
    assert d_cached.cut == d_frozen.cut == 4 and d_cached.feed.cached and not d_frozen.feed.cached
    a, b = cached.state_dict(), frozen.state_dict()
    for k in a:
        # reason: the cache computes the prefix on batches of another size than training does,
        # so conv kernels may sum in another order (fp32 rounding, amplified over the SGD steps)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the prefix did not move after the drop: weights and BatchNorm statistics as they were
    shared = {v.data_ptr() for v in d_cached.dg.split(4)[0].state_dict().values()}
    in_prefix = [k for k, v in a.items() if v.data_ptr() in shared]
    assert len(in_prefix) >= 6  # the first two conv/BatchNorm blocks' weights and statistics
    for k in in_prefix:
        assert torch.equal(a[k], at_drop[k]), k
    history = d_cached.own.history
    assert [[(st.cut, st.cached) for st in h.stretches] for h in history] == stretches
    # every epoch trains on all of its batches, once, whether the cut moved within it or not
    assert all(sum(st.steps for st in h.stretches) == d_cached.steps_per_epoch for h in history)
    assert [e.epoch for e in d_cached.events] == [drop_epoch]


def test_end_epoch_without_batches_says_what_to_call():
    data = build_data("fashion-mnist", 16, limit=64, seed=0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    model(torch.zeros(1, 3, 16, 16))  # the lazy layer takes its shape
    dropper = fxdrop.Dropper.create(model, data.train, data.val, policy=fxdrop.NoDrop(), epochs=1)
    with pytest.raises(fxdrop.FxdropError, match=r"dropper\.batches\(epoch, optimizers\)"):
        dropper.end_epoch()
    dropper.close()
