"""Side-by-side benchmark: full training vs freeze-only vs fxdrop (and the ideal), in one process.

Same seed, same data order, same epochs for every mode:
  full         NoDrop: the whole model trains from the images.
  fxdrop       LearnDrop with the activation cache.
  freeze-only  the same drop decisions as fxdrop (replayed with Schedule), but the frozen prefix
               still runs forward every step under no_grad (FreezeOut / Composer-style freezing).
  ideal        fxdrop's epochs with the suffix step timed on activations already resident on the
               device (no gather, no copy): what the cache could at best achieve.
  fxdrop+compile  (with --compile) fxdrop with torch.compile (inductor) of the trainable module.

Besides the whole-run table, a table per model gives the training step at each cut fxdrop took,
against freeze-only at the same cut, the ideal, and the cut it replaced.

Usage:
  python benchmarks/bench.py --setup cpu --models resnet18 --compile --out benchmarks/results/cpu-resnet18
  python benchmarks/bench.py --setup cpu --models vgg11_bn --out benchmarks/results/cpu-vgg11_bn
  python benchmarks/bench.py --setup gpu --compile --out benchmarks/results/gpu      # on a CUDA machine

Writes OUT/results.json, OUT/results.md and OUT/accuracy_vs_time.png (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import timm
import torch

import fxdrop
from fxdrop.costmodel import StepTimer
from fxdrop.data import build_data

SETUPS = {
    # model, img_size, train limit, epochs, batch size, peak lr (None: fit's default, 0.1 * batch / 256)
    "cpu": [("resnet18", 32, 2000, 8, 64, None),
            # reason: at 0.025 VGG-11-BN stayed at chance for 4 epochs; at 0.01 it reached 54% in 3
            ("vgg11_bn", 32, 1000, 4, 64, 0.01)],
    "gpu": [("resnet152", 224, 6000, 6, 128, None), ("resnet50", 224, 6000, 6, 128, None), ("vgg11", 224, 6000, 6, 128, None)],
}


def _ideal_step_seconds(result: fxdrop.FitResult, batch: int, device: torch.device) -> dict[int, float]:
    """Per cut taken: the suffix's training step on activations already resident on the device
    (no gather, no copy), timed like fit's cost model times it, with fit's autocast and layout."""
    cuda = device.type == "cuda"
    timer = StepTimer(result.graph, batch, device, amp=cuda, channels_last=cuda, steps=5)
    return {cut: timer.step_seconds(cut) for cut in sorted({h["cut"] for h in result.history if h["cut"] >= 0})}


def _per_cut(history: list[dict]) -> dict[int, float]:
    """Median training-step seconds of the epochs spent at each cut."""
    by_cut: dict[int, list[float]] = {}
    for h in history:
        by_cut.setdefault(h["cut"], []).append(h["step_seconds"])
    return {c: sorted(v)[len(v) // 2] for c, v in by_cut.items()}


def run_setup(name: str, img: int, limit: int, epochs: int, batch: int, lr: float | None, device: torch.device,
              workdir: Path, compile_mode: bool = False) -> dict:
    bundle = build_data("fashion-mnist", img, limit=limit, seed=0)
    # reason: one cached view, as in the paper (the fxdrop default is 2; see compare_views.py)
    common = {"epochs": epochs, "batch_size": batch, "lr": lr, "seed": 0, "device": str(device), "cache_views": 1}

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
            "step_seconds_per_cut": _per_cut(res.history),
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
    if compile_mode:
        run("fxdrop+compile", fxdrop.LearnDrop(), compile="inductor")
    steps = -(-len(bundle.train) // batch)
    ideal = _ideal_step_seconds(fx, batch, device)
    fx_mode = modes["fxdrop"]
    ideal_epochs = [ideal[c] * steps if c >= 0 else s for c, s in zip(fx_mode["cuts"], fx_mode["epoch_seconds"])]
    modes["ideal"] = {"epoch_seconds": ideal_epochs, "cuts": fx_mode["cuts"], "step_seconds_per_cut": ideal,
                      "wall_seconds": sum(ideal_epochs), "note": "fxdrop's epochs with resident activations"}
    paper = fx.graph.cut_points[max(fx_mode["cuts"])] if max(fx_mode["cuts"]) >= 0 else None
    return {"model": name, "img_size": img, "train_images": len(bundle.train), "val_images": len(bundle.val),
            "epochs": epochs, "batch_size": batch, "lr": lr, "modes": modes,
            "final_cut_forward_flops_reduction": (paper.prefix_flops / fx.graph.total_flops) if paper else 0.0}


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['device']} (torch {meta['torch']}, timm {meta['timm']}); "
             f"command: `{meta['command']}`", ""]
    for r in results:
        full = r["modes"]["full"]["wall_seconds"]
        lines += [f"### {r['model']} @ {r['img_size']} px, {r['train_images']} train images, {r['epochs']} epochs, batch {r['batch_size']}", "",
                  "| mode | wall-clock s | vs full | s/epoch | fwd FLOPs % of full | final val acc | peak device MB | cache MB | tier |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode in ("full", "freeze-only", "fxdrop", "fxdrop+compile", "ideal"):
            if mode not in r["modes"]:
                continue
            m = r["modes"][mode]
            eps = " / ".join(f"{s:.1f}" for s in m["epoch_seconds"])
            acc = f"{100 * m['final_val_acc']:.2f}" if "final_val_acc" in m else "-"
            fl = f"{100 * m['forward_flops_fraction']:.1f}" if "forward_flops_fraction" in m else "-"
            peak = f"{m['peak_device_bytes'] / 2**20:.0f}" if m.get("peak_device_bytes") else "-"
            cache = f"{m['cache_bytes'] / 2**20:.1f}" if m.get("cache_bytes") else "-"
            lines.append(f"| {mode} | {m['wall_seconds']:.1f} | {m['wall_seconds'] / full:.2f} | {eps} | {fl} | {acc} | {peak} | {cache} | {m.get('cache_tier') or '-'} |")
        lines += ["", f"Forward-FLOPs reduction at the final cut: {100 * r['final_cut_forward_flops_reduction']:.2f}%", ""]
        lines += _step_table(r)
    return "\n".join(lines)


def _step_table(r: dict) -> list[str]:
    """Training-step time at each cut fxdrop took, against freeze-only at the same cut, the ideal,
    and the cut it replaced (the targets: below freeze-only, close to the ideal, never slower).

    The "relative" columns divide each mode's step by its own step before any drop (the same
    computation in every mode), which cancels a drift of the machine's speed between the runs."""

    def ms(t: float | None) -> str:
        return "-" if t is None else f"{1e3 * t:.1f}"

    def faster(t: float, than: float | None) -> str:
        return "-" if than is None else ("yes" if t < than else f"no (+{100 * (t / than - 1):.0f}%)")

    # reason: JSON round trips turn the int cut keys into strings
    fx, fo, ideal = ({int(c): t for c, t in r["modes"][m]["step_seconds_per_cut"].items()}
                     for m in ("fxdrop", "freeze-only", "ideal"))
    lines = ["| cut | fxdrop ms/step | freeze-only ms/step | ideal ms/step | fxdrop / ideal | fxdrop relative | freeze-only relative "
             "| faster than freeze-only (relative) | faster than the cut before |",
             "|---|---|---|---|---|---|---|---|---|"]
    prev = None
    for c in sorted(fx):
        t, i, z = fx[c], ideal.get(c), fo.get(c)
        rel_fx, rel_fo = t / fx[-1], (z / fo[-1] if z is not None else None)
        lines.append(f"| {c if c >= 0 else 'none'} | {ms(t)} | {ms(z)} | {ms(i)} | {f'{t / i:.2f}' if i else '-'} | "
                     f"{rel_fx:.2f} | {'-' if rel_fo is None else f'{rel_fo:.2f}'} | "
                     f"{faster(rel_fx, rel_fo) if c >= 0 else '-'} | {faster(t, prev)} |")
        prev = t
    return lines + [""]


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
        for mode in ("full", "freeze-only", "fxdrop", "fxdrop+compile"):
            if mode not in r["modes"]:
                continue
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
    ap.add_argument("--compile", action="store_true", help="also run fxdrop with torch.compile (inductor)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/results.md and the plot from OUT/results.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((args.out / "results.json").read_text())
        md = to_markdown(saved["results"], saved["meta"])
        (args.out / "results.md").write_text(md)
        plot(saved["results"], args.out / "accuracy_vs_time.png")
        print(md)
        return
    device = torch.device("cuda" if args.setup == "gpu" else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, img, limit, epochs, batch, lr in SETUPS[args.setup]:
        if args.models and name not in args.models:
            continue
        print(f"== {name}", flush=True)
        results.append(run_setup(name, img, args.limit or limit, args.epochs or epochs, batch, lr, device, args.out / "runs", args.compile))
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
