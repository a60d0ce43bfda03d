"""LearnDrop's observations, segment by segment, on the paper-table settings: the measurements its
defaults were chosen from (docs/benchmarks.md, "How the scores were chosen").

    python benchmarks/score_traces.py finetune --epochs 4
    python benchmarks/score_traces.py scratch --epochs 4

Trains ResNet-18 on the setting with a LearnDrop that never drops, then prints per segment the
per-LR change relative to its peak (r) and the consistency of its moves two intervals apart (k).
"""

from __future__ import annotations

import argparse
import json
import math

import paper_table as pt
import timm
import torch
from safetensors.torch import load_file

import fxdrop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setting", choices=["finetune", "scratch"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=4000)
    args = p.parse_args()
    classes = [5, 6, 7, 8, 9] if args.setting == "finetune" else None
    train, val = pt.data(args.limit, classes)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5 if classes else 10)
    lr = 0.1
    if classes:
        state = load_file(str(pt.pretrained("resnet18", args.limit, 4)))
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc")}, strict=False)
        lr = 0.03
    out = pt.OUT / "runs" / f"traces-{args.setting}"
    res = fxdrop.fit(model, train, val, policy=fxdrop.LearnDrop(consistency=-math.inf), epochs=args.epochs,
                     batch_size=64, lr=lr, seed=0, out_dir=out, overwrite=True)
    obs = json.loads((out / "metrics.json").read_text())["policy"]["observations"]
    print("val acc per epoch:", [round(h["val_acc"], 3) for h in res.history])
    for s, change in obs["change"].items():
        if not change:  # reason: a segment without a weight tensor is not judged
            continue
        peak = max(change)
        print(f"segment {s:>3} r", " ".join(f"{c / peak:5.2f}" for c in change))
        print(f"segment {s:>3} k", " ".join(f"{k:5.2f}" for k in obs["consistency"][s]))
    print("train loss", " ".join(f"{v:.2f}" for v in obs["losses"]))


if __name__ == "__main__":
    main()
