"""timm train.py's recipe flags, two ways: a reference loop built as timm's `train.py` builds its
own, and `fxdrop.fit(policy=NoDrop)` with the matching FitConfig fields (issue 28's target: each
flag behaves as in timm's train.py, same final accuracy within noise on the same seed, and no flag
makes a step slower than its timm equivalent beyond noise).

    python benchmarks/recipe_vs_timm.py --setting finetune --epochs 20 --limit 2000 --seeds 0 1 2

Run it alone on the machine (timings). Writes vs-timm.md and vs-timm.json under
benchmarks/results/recipe/ (fxdrop's run folders under runs/, not kept in git).

Flags (timm train.py's -> fxdrop.fit's): none; `--clip-grad 1.0` -> clip_grad=1.0; `--mixup 0.2` ->
mixup=0.2; `--cutmix 1.0` -> cutmix=1.0; `--model-ema` -> model_ema, model_ema_eval (train.py
validates the average whenever it keeps one), `--model-ema-decay` -> model_ema_decay (`--ema-decay`,
default: an average over a tenth of the run's optimizer steps, 1 - 10 / steps; timm's 0.9998
averages over 5,000 steps, longer than these runs); `--grad-accum-steps 2` -> grad_accum_steps=2.
A flag whose FitConfig field does not exist is skipped with a printed line.

The reference is timm's train.py loop (`train_one_epoch`'s accumulation, `dispatch_clip_grad`,
`Mixup` on the batch with `SoftTargetCrossEntropy`, `ModelEmaV3.update(model, step=num_updates)`
after each update, validation of the EMA model) on timm's pieces, with everything that is not the
flag's implementation held equal to fxdrop's, so a difference is the implementation's:
  model      paper_table.py's `setting_model` (timm resnet18 from scratch, or its fine-tuning
             backbone with a new head), seeded, the same initial weights for both
  data       paper_table.py's `setting_data`; epoch e reads augmented view e, in fxdrop's order for
             the epoch (`fxdrop._rng.epoch_order`), the last partial batch kept (fxdrop keeps it;
             timm's loader drops it). A batch of odd size (timm's Mixup needs pairs) trains its last
             sample unmixed on its smoothed label
  optimizer  `timm.optim.create_optimizer_v2("sgd")` (nesterov momentum), with
             `filter_bias_and_bn=False`: fxdrop decays every parameter, timm's default exempts
             biases and norm weights
  schedule   per optimizer step, fxdrop's: linear warm-up over int(warmup_epochs x steps per epoch)
             steps, lr x (k + 1) / warm-up, then cosine to zero. timm's CosineLRScheduler cannot
             draw it (its warm-up ramps from `warmup_lr_init` with slope (lr - init) / warmup_t, so
             no setting gives (k + 1) / W followed by the cosine from W); it would move every step
  eval       top-1 on the validation set in batches of 2 x batch size after every epoch (train.py's
             `--validation-batch-size`); the final top-1 is the last epoch's (the EMA's with
             `--model-ema`)
  seeds      `timm.utils.random_seed(seed)` after the model is built (train.py's; NumPy's generator
             then draws the reference's Mixup); fxdrop draws each batch's mix from its own seeded
             stream, so with mixing the two runs see different draws of the same distribution
             (`--same-draws`: the reference draws from fxdrop's stream, which checks that the
             mixing itself is timm's, draw for draw)

Columns: top-1 of each, their difference, seconds per optimizer step (median over epochs; data
loading included, validation not), fxdrop / reference, and the largest difference between the two
runs' evaluated weights (0 where the flag's arithmetic is the same: none, clipping, EMA,
accumulation). With several seeds, accuracies and times are means over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import paper_table as pt
import timm
import torch
from safetensors.torch import load_file
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fxdrop
from fxdrop._rng import epoch_order, numpy_drawn_from
from fxdrop.config import FitConfig

OUT = Path(__file__).parent / "results" / "recipe"
BATCH = 64  # paper_table.py's batch size
# timm train.py flag -> (its arguments, fxdrop.fit's FitConfig fields); "model-ema"'s decay is the run's
FLAGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({}, {}),
    "clip-grad": ({"clip_grad": 1.0}, {"clip_grad": 1.0}),
    "mixup": ({"mixup": 0.2}, {"mixup": 0.2}),
    "cutmix": ({"cutmix": 1.0}, {"cutmix": 1.0}),
    "model-ema": ({"model_ema": True}, {"model_ema": True, "model_ema_eval": True}),
    "grad-accum-steps": ({"grad_accum_steps": 2}, {"grad_accum_steps": 2}),
}
LABELS = {
    "none": "none",
    "clip-grad": "--clip-grad 1.0",
    "mixup": "--mixup 0.2",
    "cutmix": "--cutmix 1.0",
    "model-ema": "--model-ema",
    "grad-accum-steps": "--grad-accum-steps 2",
}


@dataclass
class TimmArgs:
    """The train.py arguments the recipe flags set, at train.py's defaults."""

    clip_grad: float | None = None
    clip_mode: str = "norm"
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0  # fxdrop's label_smoothing default (train.py's is 0.1)
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    grad_accum_steps: int = 1


@dataclass(frozen=True)
class Common:
    """What both runs share: paper_table.py's settings for the run."""

    epochs: int
    lr: float
    seed: int
    momentum: float = 0.9  # FitConfig's defaults
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.5
    same_draws: bool = False  # the reference mixes with fxdrop's draws (--same-draws)


@dataclass
class Outcome:
    top1: float
    step_seconds: float  # median over epochs of the seconds per optimizer step
    curve: list[float] = field(default_factory=list)  # top-1 after each epoch
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the evaluated model's


# ---- the reference: timm train.py's loop ------------------------------------------------------


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """fxdrop's schedule per optimizer step (see the module docstring for why not timm's)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_loader(train: Dataset, seed: int, epoch: int) -> DataLoader:
    """Epoch `epoch`'s batches: augmented view `epoch`, in fxdrop's order for it."""
    train.set_view(epoch)
    return DataLoader(train, batch_size=BATCH, sampler=epoch_order(len(train), seed, epoch).tolist())


class BatchMixer:
    """train.py's `mixup_fn(input, target)`: timm's Mixup, built from train.py's arguments, drawing
    from NumPy's global generator (seeded once by `random_seed`), or with `same_draws` from fxdrop's
    stream for the batch (`fxdrop._rng.numpy_drawn_from`: the draws fxdrop's run makes). timm's Mixup
    takes pairs, so an odd batch's last sample trains unmixed on its smoothed label (timm's loader
    never makes one: it drops the last partial batch)."""

    def __init__(self, args: TimmArgs, classes: int, seed: int, same_draws: bool) -> None:
        self.mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=classes,
        )
        self.classes, self.smoothing, self.seed, self.same_draws = classes, args.smoothing, seed, same_draws

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch_idx: int):
        draws = numpy_drawn_from(self.seed, 0, epoch, batch_idx) if self.same_draws else nullcontext()
        with draws:
            if len(x) % 2 == 0:
                return self.mixup_fn(x, y)
            n = len(x) - 1
            _, target = self.mixup_fn(x[:n], y[:n])  # mixes the view x[:n], so x, in place
        return x, torch.cat([target, mixup_target(y[n:], self.classes, 1.0, self.smoothing)])


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    loss_fn: nn.Module,
    args: TimmArgs,
    mixup_fn: BatchMixer | None,
    ema: ModelEmaV3 | None,
    num_updates: int,
    epoch: int,
) -> tuple[int, float]:
    """train.py's `train_one_epoch` (no AMP, no distributed); returns the run's updates so far and
    this epoch's seconds."""
    t0 = time.perf_counter()
    model.train()
    accum_steps = args.grad_accum_steps
    last_accum_steps = len(loader) % accum_steps
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps
    optimizer.zero_grad()
    for batch_idx, (x, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if mixup_fn is not None:
            x, target = mixup_fn(x, target, epoch, batch_idx)
        loss = loss_fn(model(x), target)
        if accum_steps > 1:
            loss /= accum_steps
        loss.backward()
        if need_update:
            if args.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        loss.item()  # train.py's losses_m.update(loss.item() * accum_steps, ...)
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        if ema is not None:
            ema.update(model, step=num_updates)
        sched.step()  # train.py's lr_scheduler.step_update(num_updates=num_updates)
    return num_updates, time.perf_counter() - t0


@torch.no_grad()
def top1(model: nn.Module, val: Dataset) -> float:
    model.eval()
    correct = 0
    for x, y in DataLoader(val, batch_size=2 * BATCH):
        correct += (model(x).argmax(-1) == y).sum().item()
    return correct / len(val)


def reference_fit(
    model: nn.Module, train: Dataset, val: Dataset, classes: int, c: Common, args: TimmArgs
) -> Outcome:
    """The run as timm's train.py makes it, from the optimizer to the last validation."""
    random_seed(c.seed, 0)
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn = BatchMixer(args, classes, c.seed, c.same_draws) if mixup_active else None
    loss_fn = SoftTargetCrossEntropy() if mixup_active else nn.CrossEntropyLoss()
    optimizer = create_optimizer_v2(
        model, "sgd", lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum, filter_bias_and_bn=False
    )
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    updates_per_epoch = math.ceil(math.ceil(len(train) / BATCH) / args.grad_accum_steps)
    sched = warmup_cosine(optimizer, c.epochs * updates_per_epoch, int(c.warmup_epochs * updates_per_epoch))
    num_updates, step_seconds, curve = 0, [], []
    for epoch in range(c.epochs):
        done, seconds = train_one_epoch(
            model,
            train_loader(train, c.seed, epoch),
            optimizer,
            sched,
            loss_fn,
            args,
            mixup_fn,
            ema,
            num_updates,
            epoch,
        )
        step_seconds.append(seconds / (done - num_updates))
        num_updates = done
        curve.append(top1(ema.module if ema is not None else model, val))  # train.py: the EMA's replaces it
    evaluated = ema.module if ema is not None else model
    return Outcome(curve[-1], statistics.median(step_seconds), curve, _cpu(evaluated.state_dict()))


# ---- fxdrop ---------------------------------------------------------------------------------------


def fxdrop_fit(
    model: nn.Module, train: Dataset, val: Dataset, c: Common, fields_: dict[str, Any], out: Path
) -> Outcome:
    res = fxdrop.fit(
        model,
        train,
        val,
        policy=fxdrop.NoDrop(),
        epochs=c.epochs,
        batch_size=BATCH,
        lr=c.lr,
        seed=c.seed,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        warmup_epochs=c.warmup_epochs,
        out_dir=out,
        overwrite=True,
        **fields_,
    )
    curve = [h["val_acc"] for h in res.history]  # the validated model's: the EMA's with model_ema_eval
    ema_file = out / "model-ema.safetensors"
    weights = load_file(str(ema_file)) if fields_.get("model_ema_eval") else _cpu(model.state_dict())
    return Outcome(curve[-1], statistics.median(h["step_seconds"] for h in res.history), curve, weights)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference over the floating-point tensors both hold."""
    common = [k for k in a if k in b and a[k].is_floating_point()]
    return max((a[k] - b[k]).abs().max().item() for k in common)


# ---- the study ------------------------------------------------------------------------------------


def warm_up(args: argparse.Namespace) -> None:
    """A few untimed training steps and a validation batch, so that the process's first timed run
    does not pay for its one-time start-up (kernels chosen, memory first allocated)."""
    train, val = pt.setting_data(args.setting, args.limit, args.val)
    model, lr = pt.setting_model(args.model, args.setting, args)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    x, y = next(iter(DataLoader(train, batch_size=BATCH)))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    top1(model, torch.utils.data.Subset(val, range(min(len(val), 2 * BATCH))))


def missing_fields(flag: str) -> list[str]:
    known = {f.name for f in fields(FitConfig)}
    return [name for name in FLAGS[flag][1] if name not in known]


def run_flag(flag: str, seed: int, args: argparse.Namespace, order: int) -> dict[str, Any]:
    """Both runs of `flag` on `seed`; `order` odd: fxdrop first (the machine's speed drifts)."""
    train, val = pt.setting_data(args.setting, args.limit, args.val)
    timm_over, fx_fields = FLAGS[flag]
    targs = TimmArgs(**timm_over)
    classes = 10 if args.setting == "scratch" else len(pt.FINETUNES[args.setting][1])
    steps = args.epochs * math.ceil(math.ceil(len(train) / BATCH) / targs.grad_accum_steps)
    if targs.model_ema:
        # averaged over about a tenth of the run
        decay = args.ema_decay if args.ema_decay is not None else 1 - 1 / max(1.0, steps / 10)
        targs.model_ema_decay = decay
        fx_fields = fx_fields | {"model_ema_decay": decay}
    results: dict[str, Outcome] = {}
    for who in ("fxdrop", "reference") if order % 2 else ("reference", "fxdrop"):
        model, lr = pt.setting_model(args.model, args.setting, args)
        common = Common(args.epochs, lr, seed, same_draws=args.same_draws)
        if who == "reference":
            results[who] = reference_fit(model, train, val, classes, common, targs)
        else:
            results[who] = fxdrop_fit(
                model, train, val, common, fx_fields, args.out / "runs" / f"{flag}-{seed}"
            )
        print(
            f"{flag} seed {seed} {who}: top-1 {results[who].top1:.4f}, "
            f"{results[who].step_seconds:.4f} s/step",
            flush=True,
        )
    ref, fx = results["reference"], results["fxdrop"]
    return {
        "flag": flag,
        "seed": seed,
        "fields": fx_fields,
        "train_samples": len(train),
        "val_samples": len(val),
        "optimizer_steps": steps,
        "reference": {"top1": ref.top1, "step_seconds": ref.step_seconds, "curve": ref.curve},
        "fxdrop": {"top1": fx.top1, "step_seconds": fx.step_seconds, "curve": fx.curve},
        "max_weight_diff": max_diff(ref.weights, fx.weights),
        "fx_weights": fx.weights,  # dropped before writing; compared with the none run's
    }


def table(rows: list[dict[str, Any]], skipped: dict[str, list[str]]) -> str:
    lines = [
        "| flag | reference top-1 | fxdrop top-1 | difference | reference s/step | fxdrop s/step | ratio "
        "| max abs weight diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for flag in FLAGS:
        if flag in skipped:
            lines.append(
                f"| {LABELS[flag]} | skipped: FitConfig has no {', '.join(skipped[flag])} | | | | | | |"
            )
            continue
        runs = [r for r in rows if r["flag"] == flag]
        if not runs:
            continue
        ref = statistics.mean(r["reference"]["top1"] for r in runs)
        fx = statistics.mean(r["fxdrop"]["top1"] for r in runs)
        ref_s = statistics.mean(r["reference"]["step_seconds"] for r in runs)
        fx_s = statistics.mean(r["fxdrop"]["step_seconds"] for r in runs)
        diffs = [100 * (r["fxdrop"]["top1"] - r["reference"]["top1"]) for r in runs]
        spread = f" ({', '.join('%+.2f' % d for d in diffs)})" if len(runs) > 1 else ""
        note = " (fxdrop did not mix)" if any(r.get("not_mixed") for r in runs) else ""
        lines.append(
            f"| {LABELS[flag]}{note} | {100 * ref:.2f}% | {100 * fx:.2f}% | "
            f"{statistics.mean(diffs):+.2f} pt{spread} | {ref_s:.4f} | {fx_s:.4f} | {fx_s / ref_s:.2f}x | "
            f"{max(r['max_weight_diff'] for r in runs):.2g} |"
        )
    return "\n".join(lines) + "\n"


def noise(rows: list[dict[str, Any]]) -> str:
    """The spread of the reference's baseline top-1 over seeds: what "within noise" means here."""
    base = [r["reference"]["top1"] for r in rows if r["flag"] == "none"]
    if len(base) < 2:
        return "One seed: no noise estimate (run with --seeds 0 1 2 for one).\n"
    return (
        f"Noise: the reference's `none` top-1 over {len(base)} seeds spans "
        f"{100 * (max(base) - min(base)):.2f} pt (standard deviation {100 * statistics.stdev(base):.2f} pt).\n"
    )


def command(args: argparse.Namespace) -> str:
    """The command line that makes `args` (every option spelled out)."""
    parts = ["python benchmarks/recipe_vs_timm.py"]
    for k, v in vars(args).items():
        name = "--" + k.replace("_", "-")
        if v is None or v is False:
            continue
        parts.append(name if v is True else f"{name} {' '.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="finetune", choices=["scratch", *pt.FINETUNES])
    p.add_argument("--model", default="resnet18", help="a timm ResNet or a VGG of paper_table.py")
    p.add_argument("--epochs", type=int, default=20, help="paper_table.py's long regime for fine-tuning")
    p.add_argument("--limit", type=int, default=2000, help="Fashion-MNIST training images (class-balanced)")
    p.add_argument("--val", type=int, default=1000, help="at least this many validation images")
    p.add_argument("--flags", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--same-draws",
        action="store_true",
        help="the reference mixes with fxdrop's draws per batch: mixup and CutMix then match draw for draw",
    )
    p.add_argument("--out", type=Path, default=OUT, help="the results folder")
    p.add_argument(
        "--ema-decay", type=float, default=None, help="default: 1 - 10 / the run's optimizer steps"
    )
    p.add_argument("--lr", type=float, default=0.1, help="paper_table.py's")
    p.add_argument("--finetune-lr-scale", type=float, default=0.3, help="paper_table.py's")
    p.add_argument("--pre-limit", type=int, default=20000, help="the fine-tuning backbone's (paper_table.py)")
    p.add_argument("--pre-epochs", type=int, default=4, help="the fine-tuning backbone's (paper_table.py)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.setting != "scratch":  # reason: the backbone is made (once) outside the timed runs
        pt.pretrained(args.model, args.pre_limit, args.pre_epochs, pt.FINETUNES[args.setting][0])
    skipped = {flag: missing_fields(flag) for flag in args.flags if missing_fields(flag)}
    for flag, names in skipped.items():
        print(f"skipping {LABELS[flag]}: FitConfig has no field {', '.join(names)} yet", flush=True)
    warm_up(args)
    rows: list[dict[str, Any]] = []
    baseline: dict[int, dict[str, torch.Tensor]] = {}  # fxdrop's none weights per seed
    flags = [f for f in args.flags if f not in skipped]
    for seed in args.seeds:
        for i, flag in enumerate(sorted(flags, key=lambda f: f != "none")):  # none first: the baseline
            row = run_flag(flag, seed, args, i + seed)
            fx_weights = row.pop("fx_weights")
            if flag == "none":
                baseline[seed] = fx_weights
            elif flag in ("mixup", "cutmix") and seed in baseline:
                row["not_mixed"] = max_diff(baseline[seed], fx_weights) == 0.0
                if row["not_mixed"]:
                    print(f"{flag}: fxdrop's weights equal its none run's: its loop did not mix", flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = rows[0] if rows else {}
    head = (
        f"{args.model}, {args.setting}, {args.epochs} epochs, {sizes.get('train_samples')} training / "
        f"{sizes.get('val_samples')} validation images, batch {BATCH}, seeds {args.seeds}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, timm {timm.__version__}\n\n"
    )
    text = (
        f"# timm train.py's recipe flags: reference loop vs fxdrop.fit (policy none)\n\n`{command(args)}`\n\n"
    )
    text += head + table(rows, skipped) + "\n" + noise(rows)
    (args.out / "vs-timm.md").write_text(text)
    (args.out / "vs-timm.json").write_text(
        json.dumps(
            {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}, indent=1, default=str
        )
    )
    print(text)


if __name__ == "__main__":
    main()
