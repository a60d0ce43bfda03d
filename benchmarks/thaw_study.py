"""Freeze the front in the middle of a run and thaw it for the end: does the end give back what an
early freeze costs? (docs/benchmarks.md, "Thawing for the end")

The fixed-drop grids (score_traces.py truth) show that after an early freeze validation is as
good as or better than the live model's for several epochs, and the cost appears only in the last
part of the run, when the learning rate anneals and the live front makes its last adjustments.
This study asks whether a front frozen early and given back to training for the last stretch
recovers that cost, and at what compute.

    python benchmarks/thaw_study.py --setting finetune-rev --epochs 20 --cut layer4.0 --modes none f4 f4t14 f4t16

A mode `fA` freezes everything up to and including the cut module after epoch A (its batch-norm
statistics too) and never thaws it; `fAtB` thaws it after epoch B (fresh momentum, the run's
learning rate from there). A plain training loop with fit's recipe (SGD, Nesterov momentum 0.9,
weight decay 5e-5, half an epoch of linear warm-up, a cosine per step, batch 64); the frozen
prefix runs without gradients, as a freeze-only drop does. `none` runs in the same loop, so the
differences are the loop's own. Accuracies are deterministic at a fixed thread count; run with
`OMP_NUM_THREADS=1` (the study's runs can then share the machine; their wall-clock is not
reported, the compute is: `train_flops` counts a frozen prefix's forward, not its backward, and
the `cached` column counts the prefix's forward once, as a cache would).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import paper_table as pt
import torch
import torch.nn.functional as F

import fxdrop

OUT = Path(__file__).parent / "results" / "criterion"


def prefix_modules(model: torch.nn.Module, cut: str) -> list[torch.nn.Module]:
    """The modules up to and including `cut` (`layer4.0`: the stem, layer1-3 and layer4[0])."""
    top, _, rest = cut.partition(".")
    mods = []
    for name, child in model.named_children():
        if name == top:
            if not rest:
                mods.append(child)
            else:
                for sub_name, sub in child.named_children():
                    mods.append(sub)
                    if sub_name == rest:
                        break
            return mods
        mods.append(child)
    raise ValueError(f"no module {cut}")


def parse(mode: str) -> tuple[int | None, int | None]:
    if mode == "none":
        return None, None
    m = re.fullmatch(r"f(\d+)(?:t(\d+))?", mode)
    if not m:
        raise ValueError(f"mode {mode}: none, fA or fAtB")
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def evaluate(model, val) -> tuple[float, float]:
    model.eval()
    loss, right, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, batch_size=256):
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            right += (out.argmax(1) == y).sum().item()
            n += len(y)
    return right / n, loss / n


def run(args, mode: str, prefix_share: float) -> dict:
    freeze_at, thaw_at = parse(mode)
    train, val = pt.setting_data(args.setting, args.limit, args.val)
    model, lr = pt.setting_model(args.model, args.setting, args)
    if args.seed:  # another run of the same setting: another head and another data order
        torch.manual_seed(args.seed)
        model.get_classifier().reset_parameters()
    prefix = prefix_modules(model, args.cut)
    prefix_params = [p for m in prefix for p in m.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    steps_per_epoch = math.ceil(len(train) / 64)
    total, warm = args.epochs * steps_per_epoch, steps_per_epoch // 2
    step, frozen, curve, flops, cached = 0, False, [], 0.0, 0.0
    for epoch in range(args.epochs):
        if freeze_at is not None and epoch == freeze_at:
            frozen = True
            for p in prefix_params:
                p.requires_grad_(False)
                p.grad = None
            cached += prefix_share / 3  # a cache: the prefix's forward once
        if thaw_at is not None and epoch == thaw_at:
            frozen = False
            for p in prefix_params:
                p.requires_grad_(True)
                opt.state.pop(p, None)  # fresh momentum
        model.train()
        if frozen:
            for m in prefix:
                m.eval()
        train.set_view(epoch)  # the epoch's augmented view, as fit and a freeze-only drop read it
        g = torch.Generator().manual_seed(1000 * args.seed + epoch)
        for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=g):
            step += 1
            rate = (
                lr * step / warm
                if step <= warm
                else lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
            )
            for group in opt.param_groups:
                group["lr"] = rate
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        share = (prefix_share + 3 * (1 - prefix_share)) / 3 if frozen else 1.0
        flops += share
        cached += (1 - prefix_share) if frozen else 1.0
        acc, vloss = evaluate(model, val)
        curve.append(round(acc, 4))
        print(args.setting, mode, epoch + 1, acc, round(vloss, 4), flush=True)
    return {
        "final_acc": curve[-1],
        "val_acc": curve,
        "train_flops": round(flops / args.epochs, 4),
        "cached": round(cached / args.epochs, 4),
    }


def plot(model: str = "resnet18", epochs: int = 20, cut: str = "layer4.0") -> Path:
    """Accuracy against `none` by the epoch of the freeze, every seed and its mean, per setting
    (the runs recorded under OUT): freeze-pace.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for setting, color in (("finetune", "C0"), ("finetune-rev", "C1"), ("shift", "C2")):
        points: dict[int, list[float]] = {}
        for seed in ("", "-seed1", "-seed2"):
            path = OUT / f"thaw-{model}-{setting}-{epochs}-{cut}{seed}.json"
            if not path.exists():
                continue
            runs = json.loads(path.read_text())
            for mode, r in runs.items():
                freeze_at, thaw_at = parse(mode) if mode.startswith(("f", "none")) else (None, None)
                if freeze_at is None or thaw_at is not None:
                    continue
                points.setdefault(freeze_at, []).append(100 * (r["final_acc"] - runs["none"]["final_acc"]))
        xs = sorted(points)
        for x in xs:
            ax.scatter([100 * x / epochs] * len(points[x]), points[x], color=color, alpha=0.35, s=14)
        ax.plot(
            [100 * x / epochs for x in xs],
            [sum(points[x]) / len(points[x]) for x in xs],
            "-o",
            color=color,
            label=setting,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(-1, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"frozen up to {cut} after this share of the run (%)")
    ax.set_ylabel("final accuracy against none (pt)")
    ax.set_title("When a fine-tune's freeze stops costing (dots: seeds; lines: means)")
    ax.legend()
    out = OUT / "freeze-pace.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18", choices=pt.MODELS)
    p.add_argument("--setting", choices=["scratch", *pt.FINETUNES], default="finetune-rev")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="images drawn (2000 from scratch; 1000 for a fine-tune, which keeps the 500 of its five classes)",
    )
    p.add_argument("--val", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr-scale", type=float, default=0.3)
    p.add_argument("--pre-limit", type=int, default=20000)
    p.add_argument("--pre-epochs", type=int, default=4)
    p.add_argument("--cut", default="layer4.0")
    p.add_argument("--modes", nargs="+", default=["none", "f4", "f4t14", "f4t16"])
    p.add_argument("--seed", type=int, default=0, help="another head and data order (0: the grids')")
    p.add_argument("--again", action="store_true")
    p.add_argument("--plot", action="store_true", help="only draw freeze-pace.png from the runs recorded")
    args = p.parse_args()
    if args.plot:
        print("wrote", plot(args.model, args.epochs, args.cut))
        return
    scratch = args.setting == "scratch"
    args.limit = args.limit or (2000 if scratch else 1000)
    args.val = args.val or (1000 if scratch else 500)
    torch.manual_seed(0)
    model, _ = pt.setting_model(args.model, args.setting, args)
    dg = fxdrop.trace(model, torch.zeros(2, 3, 32, 32))
    cp = next(c for c in dg.cut_points if c.module == args.cut)
    prefix_share = 1 - cp.suffix_flops / dg.total_flops
    seed = f"-seed{args.seed}" if args.seed else ""
    path = OUT / f"thaw-{args.model}-{args.setting}-{args.epochs}-{args.cut}{seed}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    done["prefix_share"] = round(prefix_share, 4)
    for mode in args.modes:
        if mode in done and not args.again:
            continue
        result = run(args, mode, prefix_share)
        done = json.loads(path.read_text()) if path.exists() else done  # another process may have added modes
        done[mode] = result
        path.write_text(json.dumps(done, indent=1))
        print(mode, done[mode]["final_acc"], flush=True)


if __name__ == "__main__":
    main()
