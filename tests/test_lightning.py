"""LayerDropping inside a real PyTorch Lightning Trainer: drops, exactness from the cache, resume
from a Lightning checkpoint, DDP with two gloo processes, the README's example, the user's model
whole again after an exception, dict batches, the loud failure on moved Lightning internals, the
learning rate still to come read from the Trainer, and landings (against the rate set by hand,
with accumulated batches, resumed mid-landing)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import needs_fmnist, randomize_bn
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import lightning  # noqa: E402

import fxdrop  # noqa: E402
from fxdrop.data import build_data  # noqa: E402
from fxdrop.engine.step import lr_left, make_scheduler  # noqa: E402
from fxdrop.lightning import LayerDropping, LightningInternalsError  # noqa: E402

pytestmark = needs_fmnist
ROOT = Path(__file__).resolve().parents[1]


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    torch.manual_seed(0)
    model = nn.Sequential(
        *block(3, 8),
        nn.MaxPool2d(2),
        *block(8, 16),
        nn.MaxPool2d(2),
        *block(16, 16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    randomize_bn(model)
    return model


class Classifier(pl.LightningModule):
    """What a user writes: the CNN in `self.model`, SGD with a step schedule."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.model = small_cnn(num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(-1) == y).float().mean(), prog_bar=False)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]


class StopAfter(pl.Callback):
    """Ends a fit after `epochs` epochs, as an interrupted run would end."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def data():
    return build_data("fashion-mnist", 16, limit=256, seed=0, augment=False)


def _loaders(data):
    return (
        torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=False),
        torch.utils.data.DataLoader(data.val, batch_size=64),
    )


def _trainer(tmp_path, epochs, *callbacks, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        deterministic=True,
        **kw,
    )


def _fit(data, tmp_path, epochs, dropping, *callbacks, ckpt=None, **kw):
    module = Classifier(len(data.classes))
    _trainer(tmp_path, epochs, dropping, *callbacks, **kw).fit(module, *_loaders(data), ckpt_path=ckpt)
    return module


def _prefix_forwards(module: Classifier) -> list[int]:
    calls = [0]
    module.model[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_fixed_drop_from_the_cache_trains_what_the_recomputed_prefix_trains(data, tmp_path):
    cut = "5"  # after the second conv block's ReLU
    runs = {}
    for cache in (True, False):
        dropping = LayerDropping(attr="model", policy=fxdrop.Fixed(cut, 1), cache=cache, cost_model=False)
        module = Classifier(len(data.classes))
        calls = _prefix_forwards(module)
        seen = {}

        class Watch(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                seen[trainer.current_epoch] = (
                    calls[0],
                    {k: v.clone() for k, v in module.model.state_dict().items()},
                )

        _trainer(tmp_path / str(cache), 3, dropping, Watch()).fit(module, *_loaders(data))
        runs[cache] = module, seen
    (cached, seen_c), (frozen, seen_f) = runs[True], runs[False]
    for k, v in cached.model.state_dict().items():
        assert torch.equal(v, frozen.model.state_dict()[k]), k
    # the drop froze the prefix (weights and BatchNorm statistics) and the cached run stopped running it
    prefix = [k for k in seen_c[0][1] if k.split(".")[0] in {"0", "1", "2", "3", "4", "5"}]
    for k in prefix:
        assert torch.equal(seen_c[1][1][k], seen_c[2][1][k]), k
        assert torch.equal(seen_c[2][1][k], cached.model.state_dict()[k]), k
    steps = 256 // 32
    assert seen_c[2][0] == seen_c[1][0]  # epoch 3: no forward of the prefix at all
    assert seen_f[2][0] - seen_f[1][0] >= steps  # freeze-only: it ran every step
    assert any(
        k not in prefix and not torch.equal(seen_c[1][1][k], v) for k, v in cached.model.state_dict().items()
    )
    # the user's module is the whole model again, its names unchanged
    assert "forward" not in cached.model.__dict__
    assert set(cached.model.state_dict()) == set(small_cnn().state_dict())
    assert dropping.dropper.events[0]["node"] is not None


@pytest.mark.parametrize("policy", ["fixed", "default", "fixed, mid-landing"])
def test_a_lightning_checkpoint_resumes_to_the_same_result(policy, data, tmp_path):
    # mid-landing: 1.5 epochs of landing before a drop at epoch 3, the checkpoint after epoch 2
    at, landing = (3, 1.5) if policy == "fixed, mid-landing" else (1, 1.0)

    def make():
        return LayerDropping(
            attr="model",
            policy=fxdrop.Fixed("5", at) if policy.startswith("fixed") else None,
            cache_dir=str(tmp_path / "cache"),
            landing=landing,
        )

    straight = _fit(data, tmp_path / "a", 4, make())
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _fit(data, tmp_path / "b", 4, make(), ckpt, StopAfter(2))
    first = make()
    resumed = _fit(data, tmp_path / "b", 4, first, ckpt=str(tmp_path / "ck" / "last.ckpt"))
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    if policy.startswith("fixed"):
        assert first.dropper.cut >= 0 and first.dropper.events[0]["epoch"] == at + 1
    if policy == "fixed, mid-landing":  # the checkpoint fell inside the landing
        spans = {(land.start, land.end) for land in first.dropper.landings.by_segment.values()}
        assert spans == {(12, 24)}  # 8 steps an epoch: the checkpoint at step 16 is inside


@pytest.mark.distributed
def test_under_ddp_two_gloo_processes_drop_together_and_end_with_one_model(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, torch, lightning.pytorch as pl
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import fxdrop
        from fxdrop.data import build_data
        from fxdrop.lightning import LayerDropping
        from test_lightning import Classifier
        torch.set_num_threads(1)
        data = build_data("fashion-mnist", 16, limit=256, seed=0, augment=False)
        module = Classifier(len(data.classes))
        dropping = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 1))
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                             callbacks=[dropping], enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir={str(tmp_path)!r})
        trainer.fit(module, torch.utils.data.DataLoader(data.train, batch_size=16),
                    torch.utils.data.DataLoader(data.val, batch_size=32))
        flat = torch.cat([p.detach().flatten() for p in module.model.state_dict().values() if p.is_floating_point()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        torch.distributed.all_gather(gathered, flat)
        result = [dropping.dropper.cut, dropping.dropper.feed.cached, bool(torch.equal(gathered[0], gathered[1]))]
        open(f"result-{{trainer.global_rank}}.json", "w").write(json.dumps(result))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    # both ranks dropped at the same cut, train from the cache, and hold the same weights
    assert results[0] == results[1] and results[0][0] >= 0 and results[0][1:] == [True, True], results


def test_the_readme_lightning_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- lightning example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lost its Lightning example"
    code = block.group(1)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dropped up to layer3 before epoch 3 cached: True" in out.stdout, out.stdout


def test_an_unknown_option_or_attribute_is_one_clear_error(data, tmp_path):
    with pytest.raises(fxdrop.ConfigError, match="epochs"):
        LayerDropping(epochs=3)
    with pytest.raises(fxdrop.ConfigError, match="'net' is not a module"):
        _fit(data, tmp_path, 1, LayerDropping(attr="net"))


class Failing(Classifier):
    """Raises `error` in its training (or validation) step of epoch 2, after a drop at epoch 1."""

    def __init__(self, num_classes: int, where: str, error: type[BaseException]) -> None:
        super().__init__(num_classes)
        self.where, self.error = where, error

    def training_step(self, batch, batch_idx):
        if self.where == "train" and self.current_epoch == 1 and batch_idx == 2:
            raise self.error("the user's step failed")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if self.where == "val" and self.current_epoch == 1:
            raise self.error("the user's validation failed")
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize(
    "where, error", [("train", RuntimeError), ("val", RuntimeError), ("train", KeyboardInterrupt)]
)
def test_an_exception_after_a_drop_leaves_the_users_objects_as_they_were(where, error, data, tmp_path):
    module = Failing(len(data.classes), where, error)
    module.model[9].eval()  # the user's choices, which the fit must keep: a BatchNorm in eval,
    module.model[13].bias.requires_grad_(False)  # a frozen bias
    modes = [m.training for m in module.model.modules()]
    grads = [p.requires_grad for p in module.model.parameters()]
    dropping = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 1), cache_dir=str(tmp_path / "cache"))
    trainer = _trainer(tmp_path, 3, dropping)
    loaders = _loaders(data)
    sigint = signal.getsignal(signal.SIGINT)
    try:  # Lightning answers a KeyboardInterrupt with sys.exit(1), ignoring Ctrl+C meanwhile
        with pytest.raises(SystemExit if error is KeyboardInterrupt else error):
            trainer.fit(module, *loaders)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert dropping.dropper.cut >= 0 and dropping.dropper.feed.cached  # it failed after the drop
    assert "forward" not in module.model.__dict__
    assert [p.requires_grad for p in module.model.parameters()] == grads
    # the modes the fit started with (Lightning's validation does not put them back on an exception)
    assert [m.training for m in module.model.modules()] == modes
    # the optimizer names every parameter again, the loops train and validate from the user's loaders
    named = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert named == {id(p) for p in module.parameters()}
    assert trainer.train_dataloader is loaders[0] and trainer.val_dataloaders is loaders[1]
    # the model computes what a fresh copy with its weights computes, in both modes
    fresh = small_cnn(len(data.classes))
    fresh.load_state_dict(module.model.state_dict())
    x = next(iter(loaders[0]))[0]  # (B, 3, 16, 16)
    with torch.no_grad():
        for mode in (False, True):
            assert torch.equal(module.model.train(mode)(x), fresh.train(mode)(x)), mode


def test_the_modes_and_requires_grad_are_put_back_when_fit_ends(data, tmp_path):
    module = Classifier(len(data.classes))
    module.model[9].eval()
    modes = [m.training for m in module.model.modules()]
    _trainer(tmp_path, 3, LayerDropping(attr="model", policy=fxdrop.Fixed("5", 1))).fit(
        module, *_loaders(data)
    )
    assert [m.training for m in module.model.modules()] == modes
    assert all(p.requires_grad for p in module.model.parameters())


class DictSamples(torch.utils.data.Dataset):
    """A dataset of `{image_key: x, label_key: y}` samples, as Hugging Face datasets make them."""

    def __init__(self, pairs, keys) -> None:
        self.pairs, self.keys = pairs, keys

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        x, y = self.pairs[i]
        return dict(zip(self.keys, (x, y)))


class DictClassifier(Classifier):
    """The user's steps read dict batches; `seen`: (epoch, keys, channels of the image entry)."""

    def __init__(self, num_classes: int, keys) -> None:
        super().__init__(num_classes)
        self.keys, self.seen = keys, []

    def training_step(self, batch, batch_idx):
        image, label = (batch[k] for k in self.keys)
        self.seen.append((self.current_epoch, list(batch), image.shape[1]))
        return super().training_step((image, label), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step(tuple(batch[k] for k in self.keys), batch_idx)


@pytest.mark.parametrize(
    "keys, batch_keys", [(("image", "label"), None), (("pixels", "cls"), ("pixels", "cls"))]
)
def test_dict_batches_train_from_the_cache_as_pairs_do(keys, batch_keys, data, tmp_path):
    module = DictClassifier(len(data.classes), keys)
    calls = _prefix_forwards(module)
    prefix_calls = {}

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            prefix_calls[trainer.current_epoch] = calls[0]

    dropping = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 1), batch_keys=batch_keys)
    loaders = [
        torch.utils.data.DataLoader(DictSamples(loader.dataset, keys), batch_size=loader.batch_size)
        for loader in _loaders(data)
    ]
    _trainer(tmp_path / "dict", 3, dropping, Watch()).fit(module, *loaders)
    assert dropping.dropper.cut >= 0 and dropping.dropper.feed.cached
    assert prefix_calls[2] == prefix_calls[1]  # epoch 3 ran no prefix: its batches came from the cache
    # the user's step got dicts with the user's keys: images before the drop, activations after
    assert {(e, tuple(k), c) for e, k, c in module.seen} == {(0, keys, 3), (1, keys, 16), (2, keys, 16)}
    # and trained what (image, label) pairs train
    pairs = _fit(data, tmp_path / "pairs", 3, LayerDropping(attr="model", policy=fxdrop.Fixed("5", 1)))
    for k, v in pairs.model.state_dict().items():
        assert torch.equal(v, module.model.state_dict()[k]), k


class Samples(torch.utils.data.Dataset):
    def __init__(self, pairs, make) -> None:
        self.pairs, self.make = pairs, make

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.make(*self.pairs[i], i)


@pytest.mark.parametrize(
    "make, collate, says",
    [
        (lambda x, y, i: (x, y, i), None, "pairs or"),
        (lambda x, y, i: {"image": x, "label": y, "id": i}, None, "also hold \\['id'\\]"),
        (lambda x, y, i: {"a": x, "b": y}, None, "name them: LayerDropping\\(batch_keys="),
        (lambda x, y, i: {"image": x.numpy(), "label": y}, None, "not a tensor"),
        (lambda x, y, i: (x, y), lambda batch: torch.utils.data.default_collate(batch), "collate_fn"),
    ],
)
def test_a_batch_structure_it_cannot_train_from_fails_at_start_in_one_line(
    make, collate, says, data, tmp_path
):
    train, val = (
        torch.utils.data.DataLoader(Samples(loader.dataset, make), batch_size=32, collate_fn=collate)
        for loader in _loaders(data)
    )
    module = Classifier(len(data.classes))
    with pytest.raises(fxdrop.ConfigError, match=says) as err:
        _trainer(tmp_path, 2, LayerDropping(attr="model")).fit(module, train, val)
    assert "\n" not in str(err.value)
    assert "forward" not in module.model.__dict__


def test_a_lightning_without_the_internals_the_swap_needs_fails_loudly(data, tmp_path):
    class Moved(pl.Callback):
        """Runs before LayerDropping's on_train_start: the loop's source is renamed, as a later
        Lightning might."""

        def on_train_start(self, trainer, pl_module):
            loop = trainer.fit_loop
            loop._source = loop.__dict__.pop("_data_source")

    module = Classifier(len(data.classes))
    dropping = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 0))
    with pytest.raises(LightningInternalsError) as err:
        _trainer(tmp_path, 2, Moved(), dropping).fit(module, *_loaders(data))
    message = str(err.value)
    assert f"Lightning {lightning.__version__} has no `fit_loop._data_source`" in message
    assert "tested on Lightning 2.6" in message and "\n" not in message
    assert dropping.dropper is None and "forward" not in module.model.__dict__  # nothing changed


class Scheduled(Classifier):
    def __init__(self, num_classes: int, schedule: str) -> None:
        super().__init__(num_classes)
        self.schedule = schedule

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.schedule == "step per epoch":
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]
        if self.schedule == "warm-up and cosine per step":
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": make_scheduler(opt, 32, 4), "interval": "step"},
            }
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_acc"}}


def _fit_lr(schedule: str) -> list[float]:
    """The learning rate still to come (LR-epochs) at each epoch of 4 epochs of 8 steps, by `fit`'s
    formula or by hand."""
    if schedule == "warm-up and cosine per step":
        sched = make_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05), 32, 4)
        return [lr_left(sched, 8 * e, 32, 8) for e in range(4)]
    if schedule == "step per epoch":  # 0.05, 0.05, 0.025, 0.025
        return [0.15, 0.1, 0.05, 0.025]
    return [0.05 * (4 - e) for e in range(4)]  # a plateau cannot be read ahead: the rate continues


@pytest.mark.parametrize("schedule", ["step per epoch", "warm-up and cosine per step", "plateau"])
def test_the_policy_gets_the_learning_rate_still_to_come_from_the_trainer(schedule, data, tmp_path):
    dropping = LayerDropping(attr="model")  # LearnDrop keeps the rate it was given
    seen = []

    class Watch(pl.Callback):  # after LayerDropping's on_train_epoch_start
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(dropping.dropper.pstate["lr_left"])

    module = Scheduled(len(data.classes), schedule)
    _trainer(tmp_path, 4, dropping, Watch()).fit(module, *_loaders(data))
    assert seen == pytest.approx(_fit_lr(schedule), rel=1e-9)


@pytest.mark.parametrize("policy", [fxdrop.Fixed("5", 1), None])
def test_the_callback_state_in_a_checkpoint_is_plain_data(policy, data, tmp_path):
    dropping = LayerDropping(attr="model", policy=policy)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _fit(data, tmp_path, 3, dropping, ckpt)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["callbacks"][dropping.state_key]

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, bool, int, float, torch.Tensor))

    assert saved["dropper"]["cut"] == dropping.dropper.cut and plain(saved)
    assert saved["dropper"]["landings"] == dropping.dropper.landings.state_dict()


# ---- landing: a segment's rate anneals to zero before it freezes ------------------------------

PREFIX = ["0.weight", "1.weight", "1.bias", "4.weight", "5.weight", "5.bias"]  # up to cut "5"


class Moves(pl.Callback):
    """Each optimizer step's change of the first conv's weight (after LayerDropping's hooks)."""

    def __init__(self) -> None:
        self.last, self.moves = None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.last = pl_module.model[0].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.last is not None:
            self.moves.append(torch.linalg.vector_norm(pl_module.model[0].weight.detach() - self.last).item())
            self.last = None


class ByHand(pl.Callback):
    """The landing done by hand: the prefix in its own parameter group, its rate set before each
    step of [start, end) to the cosine from the run's rate at `start` to zero (never above the
    run's rate), and back to the run's rate after it."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.rate0 = start, end, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        t, (front, rest) = trainer.global_step, optimizer.param_groups
        if t == self.start:
            self.rate0 = rest["lr"]
        if self.start <= t < self.end:
            cosine = self.rate0 * 0.5 * (1 + math.cos(math.pi * (t - self.start) / (self.end - self.start)))
            front["lr"] = min(rest["lr"], cosine)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        front, rest = trainer.optimizers[0].param_groups
        front["lr"] = rest["lr"]


class TwoGroups(Classifier):
    def configure_optimizers(self):
        named = dict(self.model.named_parameters())
        groups = [
            {"params": [named[n] for n in PREFIX]},
            {"params": [p for n, p in named.items() if n not in PREFIX]},
        ]
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]


def test_a_fixed_drop_lands_as_the_rate_set_by_hand_and_drops_at_its_epoch(data, tmp_path):
    """A drop at epoch 3 with 1.5 epochs of landing (steps 12-24 of 8 a epoch, across the StepLR
    halving at step 16) against a second path: the same Trainer run with no landing and the
    prefix's rate set by hand in its own parameter group."""
    dropping, moves = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 3), landing=1.5), Moves()
    landed = _fit(data, tmp_path / "landed", 4, dropping, moves)
    assert [e["epoch"] for e in dropping.dropper.events] == [4]  # dropped when fixed, not later
    lands = dropping.dropper.landings
    assert {(land.start, land.end) for land in lands.by_segment.values()} == {(12, 24)}
    assert sorted(n for s in lands.by_segment for n in lands.segments[s]) == sorted(PREFIX)
    landing = moves.moves[12:24]
    # from step 19 the cosine (from the rate at step 12) is below the run's halved rate: falling
    assert all(b < a for a, b in zip(landing[7:], landing[8:]))
    assert landing[-1] < 0.05 * max(landing[:4])  # its last step at almost zero rate
    assert all(m == 0 for m in moves.moves[24:])  # frozen from the drop on
    assert len(moves.moves) == 32

    module = TwoGroups(len(data.classes))
    dropping = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 3), landing=0)
    _trainer(tmp_path / "by-hand", 4, dropping, ByHand(12, 24)).fit(module, *_loaders(data))
    assert [e["epoch"] for e in dropping.dropper.events] == [4]
    for k, v in landed.model.state_dict().items():
        # the landing interpolates the step (p0 + m * (p1 - p0)) where the other path scales the rate
        torch.testing.assert_close(v, module.model.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_with_accumulated_batches_a_landing_counts_optimizer_steps(data, tmp_path):
    dropping, moves = LayerDropping(attr="model", policy=fxdrop.Fixed("5", 2), landing=1), Moves()
    _fit(data, tmp_path, 3, dropping, moves, accumulate_grad_batches=2)
    assert dropping.dropper.steps_per_epoch == 4 and len(moves.moves) == 12  # 8 batches, 4 steps
    (land,) = {(land.start, land.end) for land in dropping.dropper.landings.by_segment.values()}
    assert land == (4, 8) and [e["step"] for e in dropping.dropper.events] == [8]
    assert moves.moves[7] < 0.3 * moves.moves[4] and all(m == 0 for m in moves.moves[8:])
