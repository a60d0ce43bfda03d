"""The paper's table, measured here: every policy in the same engine, side by side.

Rows: model x setting. Settings (real Fashion-MNIST images at 32 px):
  scratch   train from random weights on the 10 classes
  finetune  a model first trained on classes 0-4 (its own run, cached under the results folder),
            fine-tuned on classes 5-9 with a new head: a new task on related images
Models: timm's ResNets; VGG-11-BN / VGG-16-BN as the CIFAR-style VGG the paper trains at 32 px
(`make_model`). Modes: none (full training), learn-drop (the default), freezeout, autofreeze, and
freeze-only (learn-drop's decisions replayed with the prefix recomputed every step: what caching
adds).
Columns: wall-clock ratio to none, time to reach none's final accuracy - 1 pt, forward FLOPs over
the run, final accuracy difference, cache MB, decision seconds. The paper's figures beside.
`--pairs N` then runs N more rounds per row of none followed by each of `--pair-modes` (default
learn-drop) and reports the median of the paired wall-clock ratios: this machine's speed drifts by
up to 40% between runs minutes apart, more than most differences between modes (`--modes --pairs
3`: only the pairs, the rows' last results kept).

    python benchmarks/paper_table.py --models resnet18 --settings finetune scratch --limit 4000 --epochs 6
    python benchmarks/paper_table.py --models vgg11_bn --settings scratch --modes none learn-drop

Run it alone on the machine (timings). Writes results.json, results.md and accuracy_vs_time.png
under benchmarks/results/paper-table/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset

import fxdrop
from fxdrop.data import build_data

OUT = Path(__file__).parent / "results" / "paper-table"
# Cruciata et al. 2024, Table: forward FLOPs saved during training / accuracy change, as reported
PAPER = {
    "resnet18": "ResNet: 0.4-3.2 pt lost; up to 83.74% FLOPs saved (ResNet-152)",
    "resnet50": "ResNet: 0.4-3.2 pt lost; up to 83.74% FLOPs saved (ResNet-152)",
    "vgg11_bn": "VGG: 0.26-2.38 pt lost; 17.83% FLOPs saved (VGG-11)",
    "vgg16_bn": "VGG: 0.26-2.38 pt lost",
}
MODELS = tuple(PAPER)
MODES = ("none", "learn-drop", "freezeout", "autofreeze", "freeze-only")
# the long regime: trained to a plateau, FreezeOut's whole front, the oracle where the study has one
LONG = {"scratch": 30, "finetune": 20, "finetune-rev": 20, "shift": 20}  # epochs
LONG_MODES = (
    "none",
    "learn-drop",
    "freezeout:0.3",
    "freezeout:0.5",
    "freezeout:0.7",
    "freezeout-schedule:0.3",
    "freezeout-schedule:0.5",
    "freezeout-schedule:0.7",
)
STUDY = Path(__file__).parent / "results" / "criterion"  # score_traces.py's fixed-drop grids


class ClassSubset(Dataset):
    """The samples of `classes`, relabelled 0..k-1; augmentation views and fingerprint kept."""

    def __init__(self, base, classes: list[int]) -> None:
        self.base = base
        keep = {c: i for i, c in enumerate(classes)}
        self.rows = [i for i, y in enumerate(base.labels.tolist()) if y in keep]
        self.labels = [keep[int(base.labels[i])] for i in self.rows]
        self.tag = f"{classes}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.base[self.rows[i]][0], self.labels[i]

    def set_view(self, v: int) -> None:
        self.base.set_view(v)

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}-{self.tag}"


class Inverted(Dataset):
    """An input-level shift: every image's contrast inverted (negated after normalisation), labels
    and augmentation views kept. A front trained on the upright images must adapt to it."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return -x, y

    def set_view(self, v: int) -> None:
        self.base.set_view(v)

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}-inverted"


# the fine-tuning settings: (classes pretrained on, classes fine-tuned on, inverted images)
FINETUNES = {
    "finetune": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], False),  # same domain, new classes
    "finetune-rev": ([5, 6, 7, 8, 9], [0, 1, 2, 3, 4], False),  # the same, built the other way round
    "shift": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], True),  # new classes on inverted images
}


def setting_data(setting: str, limit: int, val: int | None = None):
    """Train and validation sets of a setting (`scratch` or one of FINETUNES)."""
    if setting == "scratch":
        return data(limit, None, val)
    _, classes, inverted = FINETUNES[setting]
    train, v = data(limit, classes, val)
    return (Inverted(train), Inverted(v)) if inverted else (train, v)


def data(limit: int, classes: list[int] | None, val: int | None = None):
    """Train and validation sets of `limit` training images (`classes` only, relabelled); at least
    `val` validation images (default: a quarter of `limit`)."""
    b = build_data("fashion-mnist", 32, limit=limit, seed=0)
    train, v = b.train, b.val
    if val is not None:
        share = 2 if classes else 1  # reason: a class subset keeps half of the split's balanced classes
        v = build_data("fashion-mnist", 32, limit=4 * val * share, seed=0).val
    if classes is None:
        return train, v
    return ClassSubset(train, classes), ClassSubset(v, classes)


def pretrained(model_name: str, limit: int, epochs: int, classes: list[int] = (0, 1, 2, 3, 4)) -> Path:
    """A model trained on `classes` of `limit` images (made once, kept under the results folder)."""
    tag = "" if list(classes) == [0, 1, 2, 3, 4] else "-c" + "".join(map(str, classes))
    path = OUT / "pretrained" / f"{model_name}-{limit}-{epochs}{tag}.safetensors"
    if path.exists():
        return path
    train, val = data(limit, list(classes))
    torch.manual_seed(0)
    model, _ = make_model(model_name, 5)
    fxdrop.fit(
        model,
        train,
        val,
        policy=fxdrop.NoDrop(),
        epochs=epochs,
        batch_size=64,
        seed=0,
        out_dir=OUT / "pretrained" / f"{model_name}{tag}-run",
        overwrite=True,
    )
    fxdrop.runs.export_model(model, path)
    return path


def make_model(model_name: str, num_classes: int) -> tuple[nn.Module, str]:
    """The model and its head's parameter prefix. VGG is the CIFAR-style VGG the paper trains at
    32 px (torchvision's convolutional `features`, then one linear layer on the 512 channels of its
    1x1 map): timm's and torchvision's ImageNet heads (4096-wide, on a map pooled up to 7x7) hold
    93% of their parameters, a head built for 224 px images."""
    if model_name.startswith("vgg"):
        features = getattr(torchvision.models, model_name)().features
        return nn.Sequential(
            OrderedDict(features=features, flatten=nn.Flatten(), fc=nn.Linear(512, num_classes))
        ), "fc"
    model = timm.create_model(model_name, num_classes=num_classes)
    return model, model.default_cfg.get("classifier", "fc")


def setting_model(model_name: str, setting: str, args) -> tuple[nn.Module, float]:
    """The setting's starting model (seeded) and learning rate: random weights from scratch, else
    the pretrained backbone with a new head at `finetune_lr_scale` of the rate."""
    torch.manual_seed(0)
    if setting == "scratch":
        return make_model(model_name, 10)[0], args.lr
    from safetensors.torch import load_file

    source = FINETUNES[setting][0]
    model, head = make_model(model_name, 5)
    weights = load_file(str(pretrained(model_name, args.pre_limit, args.pre_epochs, source)))
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(head)}, strict=False)
    return model, args.lr * args.finetune_lr_scale


def policy_for(mode: str, replay: list[dict] | None, trained: bool = False):
    """The mode's policy; a LearnDrop judges a fine-tune's front as trained, as `finetune` does."""
    if mode == "freeze-only":
        return fxdrop.Schedule(tuple((e["epoch"] - 1, e["cut"]) for e in replay or []))  # events count from 1
    policy = fxdrop.policies.parse_policy(mode)
    if trained and isinstance(policy, fxdrop.LearnDrop) and "trained_front" not in mode:
        policy = replace(policy, trained_front=True)
    return policy


def run_mode(model_name: str, setting: str, mode: str, args, replay=None) -> dict:
    train, val = setting_data(setting, args.limit, args.val)
    epochs = LONG.get(setting, LONG["finetune"]) if args.regime == "long" else args.epochs
    model, lr = setting_model(model_name, setting, args)
    out = OUT / "runs" / f"{model_name}-{setting}-{mode}"
    t0 = time.perf_counter()
    res = fxdrop.fit(
        model,
        train,
        val,
        policy=policy_for(mode, replay, trained=setting != "scratch"),
        epochs=epochs,
        batch_size=64,
        lr=lr,
        seed=0,
        cache=mode != "freeze-only",
        out_dir=out,
        overwrite=True,
    )
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    elapsed, curve = 0.0, []
    for h in res.history:
        elapsed += h["seconds"]
        curve.append((round(elapsed, 2), h["val_acc"]))
    sizes = {"limit": args.limit, "epochs": epochs, "val": len(val)}
    if setting != "scratch":
        sizes.update(pre_limit=args.pre_limit, pre_epochs=args.pre_epochs)
    return {
        "mode": mode,
        "sizes": sizes,
        "wall_s": round(wall, 2),
        "final_acc": res.final_val_acc,
        "curve": curve,
        "forward_flops": res.forward_flops_fraction,  # per step over the run
        "cache_mb": max([e["cache_bytes"] for e in res.events], default=0) / 2**20,
        "decide_s": metrics["decide_seconds"],
        "cache_build_s": metrics["cache_build_seconds"],
        "no_drop": metrics.get("no_drop"),
        "events": [
            {k: e[k] for k in ("epoch", "cut", "module", "forward_flops_fraction", "hurt") if k in e}
            for e in res.events
        ],
    }


def best_fixed(
    model_name: str, setting: str, epochs: int, none: dict | None, landed: bool = False
) -> dict | None:
    """The oracle: of score_traces.py's grid of fixed drops (cut x epoch) on this setting, in
    hindsight, the one with the least training compute within 1 pt of the grid's own `none` run
    (else the most accurate). `landed`: of the grid's drops landed over the epoch before them
    (`--landing 1`), else of those frozen at once. The grids run beside other work (and on other
    days), so their wall-clock is not compared: the oracle's cost is its training FLOPs, a forward
    and backward of the whole model until the drop and of the suffix after it (as a fraction of
    `none`'s; the frozen prefix's forward counted as cached), from the setting's trace."""
    path = STUDY / f"truth-{model_name}-{setting}-{epochs}.json"
    trace = STUDY / f"trace-{model_name}-{setting}-{epochs}.json"
    if none is None or not path.exists() or not trace.exists():
        return None
    grid = json.loads(path.read_text())
    suffix = [c["suffix_flops"] for c in json.loads(trace.read_text())["cuts"]]
    base = grid["none"]
    fixed = {m: r for m, r in grid.items() if m.startswith("fixed:") and ("+land" in m) == landed}
    if not fixed:
        return None

    def compute(r: dict) -> float:
        (drop,) = r["events"]
        before = drop["epoch"] - 1  # epochs trained whole
        return (before + (epochs - before) * suffix[drop["cut"]]) / epochs

    near = [m for m, r in fixed.items() if r["final_acc"] >= base["final_acc"] - 0.01]
    pick = (
        min(near, key=lambda m: compute(fixed[m]))
        if near
        else max(fixed, key=lambda m: fixed[m]["final_acc"])
    )
    r = fixed[pick]
    return {
        "mode": f"oracle ({pick})",
        "sizes": none.get("sizes", {}),
        "wall_s": None,
        "train_flops": compute(r),
        "final_acc": none["final_acc"] + r["final_acc"] - base["final_acc"],
        "curve": [],
        "forward_flops": float("nan"),
        "cache_mb": 0,
        "decide_s": 0.0,
        "cache_build_s": 0.0,
        "events": r["events"],
    }


def _clock(r: dict, base: dict) -> str:
    if r["wall_s"] is None:  # the oracle: its training FLOPs instead
        return f"({100 * r['train_flops']:.0f}% of the FLOPs)"
    return f"{r['wall_s'] / base['wall_s']:.2f}x ({r['wall_s']:.0f} s)"


def time_to(curve: list, target: float) -> float | None:
    return next((t for t, acc in curve if acc is not None and acc >= target), None)


def table(rows: dict, pairs: dict | None = None) -> str:
    lines = []
    for key, modes in rows.items():
        model_name, setting = key.split("/")[:2]
        base = modes["none"]
        target = base["final_acc"] - 0.01
        sizes = ", ".join(f"{k} {v}" for k, v in base.get("sizes", {}).items())
        lines += [
            f"\n### {model_name}, {setting}"
            + (", long regime" if key.endswith("/long") else "")
            + (f" ({sizes})" if sizes else "")
            + "\n",
            f"Paper: {PAPER.get(model_name, '-')}\n",
            "| mode | wall-clock vs none | time to none's acc - 1 pt | forward FLOPs | final acc | vs none | "
            "cache MB | decide s | drops (after epoch) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, r in modes.items():
            reach = time_to(r["curve"], target)
            # reason: written as fixed:CUT@N is, after N epochs (an event's epoch is the one it came in)
            drops = (
                ", ".join(
                    f"{e['module']}@{e['epoch'] - 1}" + (" (hurt)" if e.get("hurt") else "")
                    for e in r["events"]
                )
                or "-"
            )
            flops = (
                "-" if r["forward_flops"] != r["forward_flops"] else f"{100 * r['forward_flops']:.0f}%"
            )  # NaN: oracle
            lines.append(
                f"| {r.get('mode', mode)} | {_clock(r, base)} | "
                f"{'%.0f s' % reach if reach is not None else ('-' if not r['curve'] else 'never')} | {flops} | "
                f"{100 * r['final_acc']:.2f}% | {100 * (r['final_acc'] - base['final_acc']):+.2f} pt | "
                f"{r['cache_mb']:.0f} | {r['decide_s']:.3f} | {drops} |"
            )
        for mode, p in (pairs or {}).get(key, {}).items():
            ratios = sorted(p["ratios"])
            lines.append(
                f"\nPaired runs (none, {mode}) x {len(ratios)}: {mode} / none wall-clock median "
                f"{ratios[len(ratios) // 2]:.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x); {mode}'s "
                f"accuracy vs none: {', '.join('%+.2f pt' % d for d in p['acc_diffs'])}"
            )
    return "\n".join(lines) + "\n"


def _grid(plt, n: int, width: float):
    """A figure of `n` panels, three to a line, `width` inches each; the unused ones hidden."""
    cols = min(3, n)
    lines = -(-n // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(width * cols, 4 * lines), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = _grid(plt, len(rows), 6)
    for ax, (key, modes) in zip(axes.flat, rows.items()):
        for mode, r in modes.items():
            if not r["curve"]:
                continue  # reason: the oracle is a pick from another run, without a curve of its own
            ts, accs = zip(*[(t, a) for t, a in r["curve"] if a is not None])
            ax.plot(ts, [100 * a for a in accs], marker="o", label=mode)
        ax.set(title=key, xlabel="wall-clock (s)", ylabel="val accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_front(rows: dict, path: Path) -> None:
    """Per row, final accuracy against wall-clock (both relative to none): every mode a point,
    FreezeOut's t0 values joined as the front to beat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = _grid(plt, len(rows), 5.5)
    for ax, (key, modes) in zip(axes.flat, rows.items()):
        base = modes["none"]
        point = {
            m: (r["wall_s"] / base["wall_s"], 100 * (r["final_acc"] - base["final_acc"]))
            for m, r in modes.items()
            if r["wall_s"] is not None  # reason: the oracle has no wall-clock of its own
        }
        fronts = (
            ("freezeout:", "tab:gray", "freezeout, annealed (t0 front)"),
            ("freezeout-schedule", "tab:olive", "freezeout-schedule (t0 front)"),
        )
        for prefix, color, label in fronts:
            front = sorted((point[m] for m in point if m.startswith(prefix)), key=lambda p: p[0])
            if front:
                ax.plot(*zip(*front), color=color, marker="s", label=label)
        for m, (x, y) in point.items():
            if not m.startswith("freezeout"):
                ax.scatter([x], [y], label=modes[m].get("mode", m), zorder=3)
        ax.axhline(-1.0, color="tab:red", linestyle=":", linewidth=1)
        ax.set(title=key, xlabel="wall-clock vs none", ylabel="accuracy vs none (pt)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables_only() -> None:
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text())
    for key, modes in results["rows"].items():
        model_name, setting, *regime = key.split("/")
        if regime != ["long"]:
            continue
        for landed, name in ((False, "oracle"), (True, "oracle landed")):
            modes.pop(name, None)
            oracle = best_fixed(model_name, setting, LONG.get(setting, 20), modes.get("none"), landed)
            if oracle:
                modes[name] = oracle
    results_path.write_text(json.dumps(results, indent=1))
    (OUT / "results.md").write_text(table(results["rows"], results["pairs"]))
    plot(results["rows"], OUT / "accuracy_vs_time.png")
    plot_front(results["rows"], OUT / "front.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"], choices=MODELS)
    p.add_argument("--settings", nargs="+", default=["finetune", "scratch"])
    p.add_argument(
        "--regime",
        choices=["short", "long"],
        default="short",
        help="long: to a plateau (scratch 30, fine-tuning 20 epochs), FreezeOut at t0 0.3/0.5/0.7, "
        "rows keyed MODEL/SETTING/long",
    )
    p.add_argument(
        "--modes",
        nargs="*",
        default=None,
        help="modes to (re)run (also freezeout:T0); the row's other modes keep their last results "
        "(none given: only --pairs); default: every mode of the regime",
    )
    p.add_argument("--limit", type=int, default=4000, help="Fashion-MNIST training images (class-balanced)")
    p.add_argument(
        "--val", type=int, default=None, help="at least this many validation images (default: limit / 4)"
    )
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument(
        "--pre-limit",
        type=int,
        default=20000,
        help="Fashion-MNIST images (all classes, balanced) whose classes 0-4 pretrain the fine-tuned model",
    )
    p.add_argument("--pre-epochs", type=int, default=4, help="epochs of the model fine-tuning starts from")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr-scale", type=float, default=0.3)
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="then run rounds of none and each --pair-modes mode this many times per row (paired ratios)",
    )
    p.add_argument("--pair-modes", nargs="+", default=["learn-drop"])
    p.add_argument(
        "--tables-only",
        action="store_true",
        help="train nothing: recompute the long rows' oracles from the grids and write the tables and plots",
    )
    args = p.parse_args()
    if args.tables_only:
        write_tables_only()
        return
    if args.modes is None:
        args.modes = list(LONG_MODES if args.regime == "long" else MODES)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    before = json.loads(results_path.read_text()) if results_path.exists() else {}
    rows, pairs = before.get("rows", {}), before.get("pairs", {})
    for model_name in args.models:
        for setting in args.settings:
            if setting != "scratch":  # reason: the backbone is made outside the timed runs
                pretrained(model_name, args.pre_limit, args.pre_epochs, FINETUNES[setting][0])
            key = f"{model_name}/{setting}" + ("/long" if args.regime == "long" else "")
            rows.setdefault(key, {})  # reason: modes not rerun keep their last results
            for mode in args.modes:
                replay = rows[key].get("learn-drop", {}).get("events") if mode == "freeze-only" else None
                rows[key][mode] = run_mode(model_name, setting, mode, args, replay)
                print(key, mode, {k: v for k, v in rows[key][mode].items() if k != "curve"}, flush=True)
            if args.regime == "long":
                for landed, name in ((False, "oracle"), (True, "oracle landed")):
                    oracle = best_fixed(
                        model_name, setting, LONG.get(setting, 20), rows[key].get("none"), landed
                    )
                    if oracle:
                        rows[key][name] = oracle
            pairs.pop(key, None)
            for _ in range(args.pairs):  # reason: one round runs none, then each paired mode
                a = run_mode(model_name, setting, "none", args)
                for mode in args.pair_modes:
                    b = run_mode(model_name, setting, mode, args)
                    pair = pairs.setdefault(key, {}).setdefault(mode, {"ratios": [], "acc_diffs": []})
                    pair["ratios"].append(round(b["wall_s"] / a["wall_s"], 4))
                    pair["acc_diffs"].append(round(100 * (b["final_acc"] - a["final_acc"]), 2))
                    print(key, "pair", mode, a["wall_s"], b["wall_s"], pair, flush=True)
    results_path.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "args": vars(args),
                "rows": rows,
                "pairs": pairs,
            },
            indent=1,
        )
    )
    (OUT / "results.md").write_text(table(rows, pairs))
    plot(rows, OUT / "accuracy_vs_time.png")
    plot_front(rows, OUT / "front.png")
    print(table(rows, pairs))


if __name__ == "__main__":
    main()
