"""Cache formats side by side: bytes, build seconds, step seconds from each tier, final accuracy.

Sections (each writes its part of results.json; `--sections` picks some):

  runs     paper-table rows (ResNet-18 from scratch on real Fashion-MNIST at 32 px, paper_table.py's
           data and model) trained with a fixed drop and with the default policy, short (6 epochs)
           and long (30 epochs), once per format: cache bytes, build seconds, mean step seconds
           after the first drop, final accuracy, the drops
  steps    one training step of the whole model against steps from a cache at given cuts, per
           format and tier (a 224-px row: ResNet-50 on Fashion-MNIST images upscaled); the
           activations' error per format
  update   a run on a 10,000-image folder, then `fxdrop update` with 100 new images: seconds from
           the call to the first training step (scan, hashes, trace, prefix over the new images)

    python benchmarks/cache_formats.py --sections runs steps update
    python benchmarks/cache_formats.py --sections steps --model resnet50 --img-size 224 --images 256 \
        --cuts layer2 layer3 --tiers device --formats bf16 int8 --out /tmp/gpu   # what gpu_check.sh runs

Run it alone on the machine (timings). Writes results.json and results.md under
benchmarks/results/cache-formats/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import fxdrop
from fxdrop.cache import CODECS, CacheStore, codec, place
from fxdrop.data import build_data, export_fashion_mnist

sys.path.insert(0, str(Path(__file__).parent))
import paper_table  # noqa: E402  reason: the paper table's data and models, so rows are comparable

OUT = Path(__file__).parent / "results" / "cache-formats"
FORMATS = ("fp32", "bf16", "int8", "fp8")


# ---- runs ------------------------------------------------------------------------------------


def run_row(fmt: str, policy: str, epochs: int, limit: int, val: int) -> dict:
    train, v = paper_table.data(limit, None, val)
    torch.manual_seed(0)
    model, _ = paper_table.make_model("resnet18", 10)
    work = Path(tempfile.mkdtemp(prefix="fxdrop-formats-"))
    try:
        t0 = time.perf_counter()
        res = fxdrop.fit(
            model,
            train,
            v,
            policy=fxdrop.policies.parse_policy(policy),
            epochs=epochs,
            batch_size=64,
            lr=0.1,
            seed=0,
            cache_dtype=fmt,
            out_dir=work / "run",
        )
        wall = time.perf_counter() - t0
        metrics = json.loads((work / "run" / "metrics.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = res.events[0]["epoch"] if res.events else None
    after = [h for h in res.history if first is not None and h["epoch"] > first]
    return {
        "format": fmt,
        "policy": policy,
        "epochs": epochs,
        "wall_s": round(wall, 2),
        "final_acc": res.final_val_acc,
        "cache_mb": max([e["cache_bytes"] for e in res.events], default=0) / 2**20,
        "build_s": metrics["cache_build_seconds"],
        "step_ms_after_first_drop": round(1e3 * statistics.mean(h["step_seconds"] for h in after), 2)
        if after
        else None,
        # reason: after N epochs, as paper_table.py writes drops (an event's epoch is the one it came before)
        "drops": [
            f"{e['module']}@{e['epoch'] - 1}" + ("" if e["cached"] else " (freeze-only)") for e in res.events
        ],
        "dtypes": [e.get("cache_dtype") for e in res.events],
    }


def runs(args) -> dict:
    rows = {}
    for regime, epochs, fixed in (("short", 6, "fixed:layer3@2"), ("long", 30, "fixed:layer3@18")):
        for policy in (fixed, "learn-drop"):
            key = f"resnet18/scratch/{regime}/{policy}"
            rows[key] = [run_row(f, policy, epochs, args.limit, args.val) for f in args.formats]
            for r in rows[key]:
                print(key, r, flush=True)
    return rows


# ---- steps -----------------------------------------------------------------------------------


def _median_s(fn, steps: int, sync) -> float:
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # reason: the first step warms up


def steps(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = device.type == "cuda"
    b = build_data("fashion-mnist", args.img_size, limit=args.images, seed=0, augment=False)
    samples = [b.train[i] for i in range(len(b.train))]
    images = torch.stack([x for x, _ in samples]).to(device)  # (N, 3, S, S)
    y = torch.tensor([int(t) for _, t in samples], device=device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dg = fxdrop.trace(model, images[:2])
    loss_fn = torch.nn.CrossEntropyLoss()
    bs = min(args.batch, len(images))

    def train_step(net, x, yb, opt):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = loss_fn(net(x), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    whole = _median_s(lambda: train_step(model, images[:bs], y[:bs], opt), args.steps, sync)
    out = {
        "model": args.model,
        "img_size": args.img_size,
        "images": len(images),
        "batch": bs,
        "device": str(device),
        "whole_model_step_s": round(whole, 5),
        "cuts": {},
    }
    print("whole model step", whole, flush=True)
    for cut in args.cuts:
        prefix, suffix = dg.split(cut)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            acts = torch.cat([prefix(images[s : s + 64]).float() for s in range(0, len(images), 64)])
        sync()
        prefix_s = time.perf_counter() - t0
        row = {"shape": list(acts.shape[1:]), "prefix_forward_s": round(prefix_s, 3), "formats": {}}
        sopt = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        suffix.train()
        work = Path(tempfile.mkdtemp(prefix="fxdrop-steps-"))
        try:
            steppers = {("whole", "images"): lambda: train_step(model, images[:bs], y[:bs], opt)}
            for fmt in args.formats:
                c = codec(fmt)
                sample = acts[:64].cpu()
                err = c.decode(c.encode(sample)) - sample
                rel = float(err.pow(2).mean().sqrt() / sample.pow(2).mean().sqrt())
                store = CacheStore(work / fmt, fmt)

                def blocks(_, acts=acts, y=y):
                    return (
                        (acts[s : s + 64], y[s : s + 64], torch.arange(s, min(s + 64, len(acts))), 0)
                        for s in range(0, len(acts), 64)
                    )

                t0 = time.perf_counter()
                cache, _, _ = store.open_or_extend(
                    store.folder(0, cut, "train"),
                    "fp",
                    torch.arange(len(acts)),
                    blocks,
                    "disk",
                    device,
                    "train",
                )
                build_s = time.perf_counter() - t0
                row["formats"][fmt] = {
                    "cache_bytes": cache.nbytes,
                    "build_s": round(build_s, 3),
                    "rel_rms_error": round(rel, 6),
                    "step_s": {},
                }
                for tier in args.tiers:
                    if tier in ("device", "pinned") and device.type != "cuda":
                        continue
                    t = place(cache, tier, device)
                    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))

                    def step_from_cache(t=t, order=order):
                        x, yb = next(iter(t.batches(order, bs, 0, device)))
                        if device.type == "cuda" and x.dim() == 4:
                            x = x.contiguous(memory_format=torch.channels_last)
                        train_step(suffix, x, yb, sopt)

                    steppers[(fmt, tier)] = step_from_cache
            # reason: one step of each (format, tier) in turn, round after round, so the machine's
            # drift falls on every format alike; the median of the rounds, the first left out
            times: dict[tuple[str, str], list[float]] = {k: [] for k in steppers}
            for _ in range(args.steps + 1):
                for k, fn in steppers.items():
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[k].append(time.perf_counter() - t0)
            row["whole_model_step_s"] = round(statistics.median(times.pop(("whole", "images"))[1:]), 5)
            for (fmt, tier), ts in times.items():
                row["formats"][fmt]["step_s"][tier] = round(statistics.median(ts[1:]), 5)
            for fmt, f in row["formats"].items():
                print(cut, fmt, f, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        fp32_bytes = len(acts) * acts[0].numel() * 4
        for f in row["formats"].values():
            f["bytes_vs_fp32"] = round(f["cache_bytes"] / fp32_bytes, 4)
        out["cuts"][cut] = row
    return out


# ---- update ----------------------------------------------------------------------------------


def update(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fxdrop-update-speed-"))
    try:
        data = work / "data"
        export_fashion_mnist(str(data), limit=args.update_images + 100)
        # reason: hold back 100 training images, 10 per class, as the new ones
        new = []
        for cls in sorted((data / "train").iterdir()):
            for f in sorted(cls.iterdir())[:10]:
                new.append((f, work / "new" / cls.name / f.name))
        for src, dst in new:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, dst)
        out = work / "run"
        n_train = sum(1 for _ in (data / "train").glob("*/*"))
        t0 = time.perf_counter()
        fxdrop.finetune(
            "timm:resnet18",
            str(data),
            out,
            pretrained=False,
            img_size=32,
            epochs=1,
            policy=fxdrop.policies.parse_policy("fixed:layer3@0"),
        )
        first_run = time.perf_counter() - t0
        for src, dst in new:
            shutil.move(dst, src)
        marks: dict[str, float] = {}
        t0 = time.perf_counter()

        def on_event(kind, info):
            if kind not in marks:
                marks[kind] = time.perf_counter() - t0

        fxdrop.update_folder(out, str(data), epochs=1, on_event=on_event)
        total = time.perf_counter() - t0
        u = json.loads((out / "metrics.json").read_text())["updates"][-1]
        return {
            "train_images": n_train,
            "new_images": len(new),
            "first_run_s": round(first_run, 1),
            "to_first_step_s": round(marks.get("step", float("nan")), 3),
            "update_total_s": round(total, 2),
            "events_s": {k: round(v, 3) for k, v in marks.items()},
            "prefix_samples": u["prefix_samples"],
            "reused_samples": u["reused_samples"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------


def table(res: dict) -> str:
    lines = [f"# Cache formats ({res.get('machine', '?')}, torch {res.get('torch', '?')})\n"]
    for key, rows in res.get("runs", {}).items():
        base = next((r for r in rows if r["format"] == "fp32"), rows[0])
        lines += [
            f"\n### {key}\n",
            "| format | cache MiB | vs fp32 | build s | step ms after drop | wall s | final acc | "
            "vs fp32 | drops (after epoch) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ratio = f"{r['cache_mb'] / base['cache_mb']:.3f}x" if base["cache_mb"] else "-"
            lines.append(
                f"| {r['format']} | {r['cache_mb']:.1f} | {ratio} | {r['build_s']:.2f} | "
                f"{r['step_ms_after_first_drop']} | {r['wall_s']:.0f} | {100 * r['final_acc']:.2f}% | "
                f"{100 * (r['final_acc'] - base['final_acc']):+.2f} pt | {', '.join(r['drops']) or '-'} |"
            )
    for name, s in res.get("steps", {}).items():
        lines += [
            f"\n### steps: {name} ({s['model']} at {s['img_size']} px, {s['images']} images, batch {s['batch']}, "
            f"{s['device']})\n",
            f"Whole model: {1e3 * s['whole_model_step_s']:.1f} ms a step (timed alone); each cut's "
            "steps, the whole model's included, were timed in turn, round after round (medians).\n",
            "| cut | shape | format | cache MiB | vs fp32 | build s | rel. RMS error | step ms by tier "
            "| fastest vs whole model |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for cut, row in s["cuts"].items():
            for fmt, f in row["formats"].items():
                tiers = ", ".join(f"{t} {1e3 * v:.1f}" for t, v in f["step_s"].items())
                best = min(f["step_s"].values()) if f["step_s"] else float("nan")
                lines.append(
                    f"| {cut} | {'x'.join(map(str, row['shape']))} | {fmt} | {f['cache_bytes'] / 2**20:.1f} | "
                    f"{f['bytes_vs_fp32']:.3f}x | {f['build_s']:.2f} | {f['rel_rms_error']:.2e} | {tiers} | "
                    f"{best / row.get('whole_model_step_s', s['whole_model_step_s']):.2f}x |"
                )
    if "update" in res:
        u = res["update"]
        lines += [
            "\n### update speed\n",
            f"A run on {u['train_images']:,} training images (ResNet-18, 32 px, cut at "
            f"layer3), then `update_folder` with {u['new_images']} new ones: first training step after "
            f"**{u['to_first_step_s']:.2f} s** (update total {u['update_total_s']:.1f} s; "
            f"{u['prefix_samples']} samples through the prefix, {u['reused_samples']} reused). Events (s from "
            f"the call): {u['events_s']}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sections", nargs="+", default=["runs", "steps", "update"], choices=["runs", "steps", "update"]
    )
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(CODECS))
    p.add_argument(
        "--limit", type=int, default=2000, help="runs: training images (the long paper-table row's)"
    )
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="steps: images cached")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps: timed steps per measurement (median)")
    p.add_argument("--cuts", nargs="+", default=["layer1", "layer2", "layer3"])
    p.add_argument(
        "--tiers", nargs="+", default=["memory", "disk"], choices=["device", "pinned", "memory", "disk"]
    )
    p.add_argument("--device", default=None)
    p.add_argument("--update-images", type=int, default=10000)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res |= {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if "runs" in args.sections:
        res["runs"] = runs(args)
    if "steps" in args.sections:
        res.setdefault("steps", {})[f"{args.model}-{args.img_size}px"] = steps(args)
    if "update" in args.sections:
        res["update"] = update(args)
        print("update", res["update"], flush=True)
    path.write_text(json.dumps(res, indent=1))
    (args.out / "results.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
