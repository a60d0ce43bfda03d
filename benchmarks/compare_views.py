"""Which `cache_views` default is better: K augmented views per sample cached, rotated by epoch.

Usage: python benchmarks/compare_views.py [--epochs 6] [--limit 2000] [--out FILE]
Drops at a fixed cut after epoch 1 (Fixed("layer2", 1)), so every K trains the same suffix.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

import fxdrop
from fxdrop.data import build_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--views", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--out", default="views.json")
    args = ap.parse_args()
    bundle = build_data("fashion-mnist", 32, limit=args.limit, seed=0)
    out = {}
    for k in args.views:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=len(bundle.classes))
        t0 = time.perf_counter()
        res = fxdrop.fit(
            model,
            bundle.train,
            bundle.val,
            policy=fxdrop.Fixed("layer2", 1),
            epochs=args.epochs,
            batch_size=64,
            seed=0,
            cache_views=k,
        )
        out[k] = {
            "final_val_acc": res.final_val_acc,
            "val_acc": [h["val_acc"] for h in res.history],
            "seconds": time.perf_counter() - t0,
            "cache_mb": res.cache_bytes / 2**20,
            "cache_seconds": res.events[0]["cache_seconds"],
        }
        print(k, out[k], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
