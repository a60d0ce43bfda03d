"""Accuracy and forward FLOPs of each drop policy on one setup (same seed, data, epochs).

Usage: python benchmarks/compare_policies.py [--epochs 4] [--limit 2000] [--out FILE]
Timings printed here are wall-clock of the whole fit; compare them only within one quiet run.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

import fxdrop
from fxdrop.data import build_data

POLICIES = {
    "learn-drop": fxdrop.LearnDrop(),
    "learn-drop per-lr": fxdrop.LearnDrop(per_lr=True),
    "freezeout": fxdrop.FreezeOut(),
    "none": fxdrop.NoDrop(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--out", default="policies.json")
    args = ap.parse_args()
    bundle = build_data("fashion-mnist", args.img_size, limit=args.limit, seed=0)
    out = {}
    for name, policy in POLICIES.items():
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=len(bundle.classes))
        t0 = time.perf_counter()
        res = fxdrop.fit(model, bundle.train, bundle.val, policy=policy, epochs=args.epochs, batch_size=64, seed=0)
        out[name] = {"final_val_acc": res.final_val_acc, "seconds": time.perf_counter() - t0,
                     "forward_flops_fraction": [round(h["forward_flops_fraction"], 3) for h in res.history],
                     "drops": [(e["epoch"], e["cut"], e["module"]) for e in res.events]}
        print(name, out[name], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
