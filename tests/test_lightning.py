"""LayerDropping inside a real PyTorch Lightning Trainer: drops, exactness from the cache, resume
from a Lightning checkpoint, DDP with two gloo processes, and the README's example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import needs_fmnist, randomize_bn
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import fxdrop  # noqa: E402
from fxdrop.data import build_data  # noqa: E402
from fxdrop.lightning import LayerDropping  # noqa: E402

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


@pytest.mark.parametrize("policy", ["fixed", "default"])
def test_a_lightning_checkpoint_resumes_to_the_same_result(policy, data, tmp_path):
    def make():
        return LayerDropping(
            attr="model",
            policy=fxdrop.Fixed("5", 1) if policy == "fixed" else None,
            cache_dir=str(tmp_path / "cache"),
        )

    straight = _fit(data, tmp_path / "a", 4, make())
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _fit(data, tmp_path / "b", 4, make(), ckpt, StopAfter(2))
    first = make()
    resumed = _fit(data, tmp_path / "b", 4, first, ckpt=str(tmp_path / "ck" / "last.ckpt"))
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    if policy == "fixed":
        assert first.dropper.cut >= 0 and first.dropper.events[0]["epoch"] == 2


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
    assert 15 <= len(code.strip().splitlines()) <= 35
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
