"""Mixup/CutMix and a drop: what mixing is worth once the images are gone (issue 28, item 1).

For one setting of paper_table.py (its data, starting model and learning rate, the long regime's
epochs), the same run five ways, all with the same label smoothing:

    none+mix         no drop, mixing images throughout: the reference a drop must keep up with
    none             no drop, no mixing: what mixing itself gives this setting
    DROP+activations the drop, mixing images before it and the cut's activations after it
                     (`mix_after_drop="activations"`: CutMix a box on the feature map)
    DROP+stop        the drop, mixing images before it and nothing after (`mix_after_drop="stop"`)
    DROP             the drop without mixing

DROP is each of `--drops` (learn-drop, the default, or fixed:CUT@EPOCH, ...); the two none runs
are shared by every drop of the setting. The table gives each run's final and best accuracy, its
difference from none+mix, its wall-clock and ratio to none+mix, and its drops; results.json keeps
the curves. Run it alone on the machine (timings), e.g.

    python benchmarks/mixing_study.py --setting finetune --regime long --drops learn-drop fixed:layer3@4
    python benchmarks/mixing_study.py --setting scratch --regime long --drops learn-drop --runs drop+stop

Writes results.json and results.md under --out (default benchmarks/results/mixing/), one section
per model/setting/regime; a run rerun replaces its last result, the others are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import paper_table as pt
import torch

import fxdrop

OUT = Path(__file__).parent / "results" / "mixing"
RUNS = ("none+mix", "none", "drop+activations", "drop+stop", "drop")


def run_one(run: str, drop: str, args) -> dict:
    """One run of the setting: `run` is one of RUNS, `drop` the policy its `drop` stands for."""
    train, val = pt.setting_data(args.setting, args.limit, args.val)
    epochs = pt.LONG[args.setting] if args.regime == "long" else args.epochs
    model, lr = pt.setting_model(args.model, args.setting, args)
    policy, _, after = run.partition("+")
    policy = drop if policy == "drop" else policy
    mixing = {}
    if after:
        mixing = dict(
            mixup=args.mixup,
            cutmix=args.cutmix,
            mixup_mode=args.mixup_mode,
            mix_after_drop="activations" if after == "mix" else after,
        )
    name = f"{policy}+{after}" if after else policy
    out = args.out / "runs" / f"{args.model}-{args.setting}-{args.regime}-{_tag(name)}"
    t0 = time.perf_counter()
    res = fxdrop.fit(
        model,
        train,
        val,
        policy=fxdrop.policies.parse_policy(policy),
        epochs=epochs,
        batch_size=64,
        lr=lr,
        seed=0,
        label_smoothing=args.smoothing,
        out_dir=out,
        overwrite=True,
        **mixing,
    )
    return {
        "run": name,
        "mixing": mixing,
        "wall_s": round(time.perf_counter() - t0, 2),
        "final_acc": res.final_val_acc,
        "best_acc": res.best_val_acc,
        "best_epoch": res.best_epoch,
        "curve": [h["val_acc"] for h in res.history],
        "forward_flops": res.forward_flops_fraction,
        "drops": [f"{e['module']}@{e['epoch'] - 1}" for e in res.events],  # as fixed:CUT@N writes it
        "sizes": {"limit": args.limit, "epochs": epochs, "val": len(val)},
    }


def _tag(name: str) -> str:
    return name.replace(":", "-").replace("@", "at")


def table(sections: dict) -> str:
    lines = []
    for key, rows in sections.items():
        base = rows.get("none+mix")
        sizes = ", ".join(f"{k} {v}" for k, v in next(iter(rows.values()))["sizes"].items())
        lines += [
            f"\n### {key} ({sizes})\n",
            "| run | final acc | vs none+mix | best acc (epoch) | wall-clock | vs none+mix | forward FLOPs "
            "| drops (after epoch) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows.values():
            vs_acc = f"{100 * (r['final_acc'] - base['final_acc']):+.2f} pt" if base else "-"
            vs_clock = f"{r['wall_s'] / base['wall_s']:.2f}x" if base else "-"
            best = f"{100 * r['best_acc']:.2f}% ({r['best_epoch']})" if r["best_acc"] is not None else "-"
            lines.append(
                f"| {r['run']} | {100 * r['final_acc']:.2f}% | {vs_acc} | {best} | {r['wall_s']:.0f} s | "
                f"{vs_clock} | {100 * r['forward_flops']:.0f}% | {', '.join(r['drops']) or '-'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=pt.MODELS)
    p.add_argument("--setting", default="finetune", choices=("scratch", *pt.FINETUNES))
    p.add_argument(
        "--regime",
        choices=["short", "long"],
        default="long",
        help="long: paper_table's long regime (scratch 30, fine-tuning 20 epochs); short: --epochs",
    )
    p.add_argument("--epochs", type=int, default=6, help="epochs in the short regime")
    p.add_argument(
        "--drops", nargs="+", default=["learn-drop"], help="drop policies: learn-drop, fixed:CUT@EPOCH, ..."
    )
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="which of the five to (re)run")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (timm's --mixup)")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (timm's --cutmix)")
    p.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    p.add_argument(
        "--smoothing", type=float, default=0.1, help="label smoothing of every run (timm's default)"
    )
    p.add_argument("--limit", type=int, default=4000, help="Fashion-MNIST training images (class-balanced)")
    p.add_argument("--val", type=int, default=None, help="at least this many validation images")
    p.add_argument("--pre-limit", type=int, default=20000, help="images the fine-tuned backbone trained on")
    p.add_argument("--pre-epochs", type=int, default=4, help="epochs of the fine-tuned backbone")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr-scale", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = p.parse_args()
    for drop in args.drops:
        fxdrop.policies.parse_policy(drop)  # a bad --drops fails before any training
    if args.setting != "scratch":  # reason: the backbone is made outside the timed runs
        pt.pretrained(args.model, args.pre_limit, args.pre_epochs, pt.FINETUNES[args.setting][0])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"sections": {}}
    key = f"{args.model}/{args.setting}/{args.regime}"
    rows = results["sections"].setdefault(key, {})
    todo = [(run, None) for run in RUNS[:2] if run in args.runs]  # reason: none runs once for every drop
    todo += [(run, drop) for drop in args.drops for run in RUNS[2:] if run in args.runs]
    for run, drop in todo:
        r = run_one(run, drop, args)
        rows[r["run"]] = r
        print(key, {k: v for k, v in r.items() if k != "curve"}, flush=True)
    # none's two runs first, then each drop's
    results["sections"][key] = dict(sorted(rows.items(), key=lambda kv: not kv[0].startswith("none")))
    results |= {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    path.write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table(results["sections"]))
    print(table({key: results["sections"][key]}))


if __name__ == "__main__":
    main()
