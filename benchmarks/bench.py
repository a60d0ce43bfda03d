"""Side-by-side benchmark: full training vs freeze-only vs fxdrop (and the ideal), in one process.

Same seed, same data order, same epochs for every mode:
  full         NoDrop: the whole model trains from the images.
  fxdrop       LearnDrop with the activation cache.
  freeze-only  the same drop decisions as fxdrop (replayed with Schedule), but the frozen prefix
               still runs forward every step under no_grad (FreezeOut / Composer-style freezing).
  ideal        fxdrop's epochs with the suffix step timed on activations already resident on the
               device (no gather, no copy): what the cache could at best achieve.

Usage:
  python benchmarks/bench.py --setup cpu --out benchmarks/results/cpu
  python benchmarks/bench.py --setup gpu --out benchmarks/results/gpu      # on a CUDA machine

Writes OUT/results.json, OUT/results.md and OUT/accuracy_vs_time.png (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import fxdrop
from fxdrop.data import build_data

SETUPS = {
    # model, img_size, train limit, epochs, batch size
    "cpu": [("resnet18", 32, 2000, 4, 64), ("vgg11_bn", 32, 1000, 4, 64)],
    "gpu": [("resnet152", 224, 6000, 6, 128), ("resnet50", 224, 6000, 6, 128), ("vgg11", 224, 6000, 6, 128)],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ideal_epoch_seconds(result: fxdrop.FitResult, steps: int, batch: int, device: torch.device) -> dict[int, float]:
    """Per cut taken: a training epoch of the suffix on a resident batch (median step x steps)."""
    out = {}
    for cut in sorted({h["cut"] for h in result.history if h["cut"] >= 0}):
        model = copy.deepcopy(result.model)
        for p in model.parameters():
            p.requires_grad_(True)  # reason: the trained model has its final prefix frozen; split(cut) refreezes
        dg = fxdrop.trace(model, result.graph.example_input)
        prefix, suffix = dg.split(cut)
        with torch.no_grad():
            a = prefix(result.graph.example_input[:1].expand(batch, *result.graph.example_input.shape[1:]).contiguous())
        a = (a + 0.01 * torch.randn_like(a)).detach()
        y = torch.zeros(batch, dtype=torch.long, device=a.device)
        opt = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
        suffix.train()
        times = []
        for i in range(6):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out_ = suffix(a)
                loss = F.cross_entropy((out_[0] if isinstance(out_, tuple) else out_).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[cut] = sorted(times)[len(times) // 2] * steps
    return out


def run_setup(name: str, img: int, limit: int, epochs: int, batch: int, device: torch.device, workdir: Path) -> dict:
    bundle = build_data("fashion-mnist", img, limit=limit, seed=0)
    # reason: one cached view, as in the paper (the fxdrop default is 2; see compare_views.py)
    common = {"epochs": epochs, "batch_size": batch, "seed": 0, "device": str(device), "cache_views": 1}

    def model():
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=len(bundle.classes))

    modes: dict[str, dict] = {}

    def run(mode: str, policy, **kw):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = fxdrop.fit(model(), bundle.train, bundle.val, policy=policy, out_dir=workdir / f"{name}-{mode}",
                         overwrite=True, **common, **kw)
        wall = time.perf_counter() - t0
        flops = [h["forward_flops_fraction"] for h in res.history]
        if mode == "freeze-only":
            flops = [1.0] * len(flops)  # reason: the frozen prefix still runs forward every step
        modes[mode] = {
            "wall_seconds": wall,
            "epoch_seconds": [h["seconds"] for h in res.history],
            "val_acc": [h["val_acc"] for h in res.history],
            "cuts": [h["cut"] for h in res.history],
            "forward_flops_fraction": sum(flops) / len(flops),
            "final_val_acc": res.final_val_acc,
            "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "cache_bytes": res.cache_bytes,
            "cache_tier": res.events[-1]["cache_tier"] if res.events and "cache_tier" in res.events[-1] else None,
            "events": res.events,
        }
        return res

    run("full", fxdrop.NoDrop())
    fx = run("fxdrop", fxdrop.LearnDrop())
    schedule = tuple((e["epoch"], e["cut"]) for e in fx.events)
    run("freeze-only", fxdrop.Schedule(schedule), cache=False)
    steps = -(-len(bundle.train) // batch)
    ideal = _ideal_epoch_seconds(fx, steps, batch, device)
    fx_mode = modes["fxdrop"]
    ideal_epochs = [ideal.get(c, s) if c >= 0 else s for c, s in zip(fx_mode["cuts"], fx_mode["epoch_seconds"])]
    modes["ideal"] = {"epoch_seconds": ideal_epochs, "cuts": fx_mode["cuts"],
                      "wall_seconds": sum(ideal_epochs), "note": "fxdrop's epochs with resident activations"}
    paper = fx.graph.cut_points[max(fx_mode["cuts"])] if max(fx_mode["cuts"]) >= 0 else None
    return {"model": name, "img_size": img, "train_images": len(bundle.train), "val_images": len(bundle.val),
            "epochs": epochs, "batch_size": batch, "modes": modes,
            "final_cut_forward_flops_reduction": (paper.prefix_flops / fx.graph.total_flops) if paper else 0.0}


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['device']} (torch {meta['torch']}, timm {meta['timm']}); "
             f"command: `{meta['command']}`", ""]
    for r in results:
        full = r["modes"]["full"]["wall_seconds"]
        lines += [f"### {r['model']} @ {r['img_size']} px, {r['train_images']} train images, {r['epochs']} epochs, batch {r['batch_size']}", "",
                  "| mode | wall-clock s | vs full | s/epoch | fwd FLOPs % of full | final val acc | peak device MB | cache MB | tier |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode in ("full", "freeze-only", "fxdrop", "ideal"):
            m = r["modes"][mode]
            eps = " / ".join(f"{s:.1f}" for s in m["epoch_seconds"])
            acc = f"{100 * m['final_val_acc']:.2f}" if "final_val_acc" in m else "-"
            fl = f"{100 * m['forward_flops_fraction']:.1f}" if "forward_flops_fraction" in m else "-"
            peak = f"{m['peak_device_bytes'] / 2**20:.0f}" if m.get("peak_device_bytes") else "-"
            cache = f"{m['cache_bytes'] / 2**20:.1f}" if m.get("cache_bytes") else "-"
            lines.append(f"| {mode} | {m['wall_seconds']:.1f} | {m['wall_seconds'] / full:.2f} | {eps} | {fl} | {acc} | {peak} | {cache} | {m.get('cache_tier') or '-'} |")
        lines += ["", f"Forward-FLOPs reduction at the final cut: {100 * r['final_cut_forward_flops_reduction']:.2f}%", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'fxdrop[plot]')", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for mode in ("full", "freeze-only", "fxdrop"):
            m = r["modes"][mode]
            t, acc = 0.0, []
            for s, a in zip(m["epoch_seconds"], m["val_acc"]):
                t += s
                acc.append((t, a))
            ax.plot([p[0] for p in acc], [100 * p[1] for p in acc], marker="o", label=mode)
        ax.set_title(f"{r['model']} @ {r['img_size']}px")
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("val accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=sorted(SETUPS), default="cpu")
    ap.add_argument("--models", nargs="*", help="subset of the setup's models")
    ap.add_argument("--epochs", type=int, help="override the setup's epochs")
    ap.add_argument("--limit", type=int, help="override the setup's training-image count")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    args = ap.parse_args()
    device = torch.device("cuda" if args.setup == "gpu" else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, img, limit, epochs, batch in SETUPS[args.setup]:
        if args.models and name not in args.models:
            continue
        print(f"== {name}", flush=True)
        results.append(run_setup(name, img, args.limit or limit, args.epochs or epochs, batch, device, args.out / "runs"))
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "timm": timm.__version__, "command": " ".join(["python", *sys.argv])}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    md = to_markdown(results, meta)
    (args.out / "results.md").write_text(md)
    plot(results, args.out / "accuracy_vs_time.png")
    print(md)


if __name__ == "__main__":
    main()
