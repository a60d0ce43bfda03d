"""Data that arrives over time: chunks of real Fashion-MNIST images arriving one after the other.

A model trained before (`--pre-epochs` on other Fashion-MNIST images, full training) is
fine-tuned on chunk 0, dropping up to `layer3` after its first epochs (`--first-policy`; the
default policy's own decisions are the subject of paper_table.py): the first run. Then, as each chunk k arrives,
the model trains on the images seen so far (chunks 0..k), `--epochs` epochs, four ways:

  update          fxdrop update (the run's cut and policy state, its persistent cache: only the
                  new chunk goes through the frozen prefix)
  update-new      fxdrop update --replay new (trains on the new chunk only)
  no-cache        fxdrop update with the cache removed after every update (what fxdrop did before
                  the cache was kept and keyed by sample: the prefix runs over everything seen)
  retrain-none    fine-tune the last model on everything seen with full training (--policy none)

Per chunk: wall-clock of the whole command (data scan included), validation accuracy of the whole
model, images through the prefix and its seconds, the cut. The validation set is fixed.

    python benchmarks/stream.py --chunks 5 --chunk-size 1000 --epochs 2 --work /tmp/fxdrop-stream

Run it alone on the machine (timings). Writes results.json, results.md and stream.png under
benchmarks/results/stream/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

import fxdrop
from fxdrop.data import export_fashion_mnist
from fxdrop.policies import parse_policy

OUT = Path(__file__).parent / "results" / "stream"
MODES = ("update", "update-new", "no-cache", "retrain-none")


PRE = 2  # chunks' worth of other images the model is first trained on


def make_chunks(root: Path, chunks: int, chunk_size: int) -> tuple[Path, list[Path]]:
    """The pretraining folder and seen-0 .. seen-(chunks-1): seen-k holds the training images of
    chunks 0..k and every validation image. Training images go round robin, class by class, to
    the pretraining set and the chunks, so each is class-balanced and none shares an image; files
    are hard links to one export."""
    every = root / "export"
    if not every.is_dir():
        export_fashion_mnist(str(every), limit=(chunks + PRE) * chunk_size)
    parts = chunks + PRE

    def link(folder: Path, keep) -> Path:
        if not folder.is_dir():
            for split in ("train", "val"):
                for cls in sorted((every / split).iterdir()):
                    (folder / split / cls.name).mkdir(parents=True)
                    for i, f in enumerate(sorted(cls.iterdir())):
                        if split == "val" or keep(i % parts):
                            os.link(f, folder / split / cls.name / f.name)
        return folder

    pre = link(root / "pretrain", lambda part: part >= chunks)
    return pre, [link(root / f"seen-{k}", lambda part, k=k: part <= k) for k in range(chunks)]


def _record(result: fxdrop.FitResult, seconds: float, mode: str, chunk: int) -> dict:
    u = result.update or {}
    cut = result.graph.cut_points[result.cut].module if result.cut >= 0 else None
    return {
        "mode": mode,
        "chunk": chunk,
        "seconds": round(seconds, 2),
        "val_acc": round(result.final_val_acc, 4),
        "prefix_samples": u.get("prefix_samples"),
        "prefix_seconds": u.get("prefix_seconds"),
        "new_samples": u.get("new_samples"),
        "cut": cut,
        "train_epoch_seconds": [e["seconds"] for e in result.history],
    }


def run_stream(args: argparse.Namespace, work: Path) -> list[dict]:
    pre, seen = make_chunks(work / "data", args.chunks, args.chunk_size)
    common = dict(img_size=32, batch_size=args.batch_size, lr=args.lr, seed=0)
    trained = work / "pretrained"
    if not (trained / "metrics.json").exists():
        r = fxdrop.finetune(
            args.model,
            str(pre),
            trained,
            policy=fxdrop.NoDrop(),
            epochs=args.pre_epochs,
            overwrite=True,
            **common,
        )
        print(f"pretrained: acc {r.final_val_acc:.4f}", flush=True)
    first = work / "first"
    if not (first / "metrics.json").exists():
        t0 = time.perf_counter()
        r = fxdrop.finetune(
            args.model,
            str(seen[0]),
            first,
            weights=str(trained / "model.safetensors"),
            policy=parse_policy(args.first_policy),
            epochs=args.first_epochs,
            overwrite=True,
            **common,
        )
        drops = [(e["module"], e["epoch"]) for e in r.events]
        print(
            f"first run: {time.perf_counter() - t0:.1f}s acc {r.final_val_acc:.4f} drops {drops}", flush=True
        )
    rows = []
    for mode in args.modes:
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(first, out)
        if mode == "no-cache":
            shutil.rmtree(out / "cache", ignore_errors=True)
        for k in range(1, args.chunks):
            t0 = time.perf_counter()
            if mode == "retrain-none":
                prev = work / mode if k == 1 else work / f"{mode}-{k - 1}"
                dst = work / f"{mode}-{k}"
                result = fxdrop.finetune(
                    args.model,
                    str(seen[k]),
                    dst,
                    weights=str(prev / "model.safetensors"),
                    policy=fxdrop.NoDrop(),
                    epochs=args.epochs,
                    warmup_epochs=0.0,
                    overwrite=True,
                    **common,
                )
            else:
                result = fxdrop.update_folder(
                    out,
                    str(seen[k]),
                    epochs=args.epochs,
                    replay="new" if mode == "update-new" else "all",
                    keep_cache=mode != "no-cache",
                )
            row = _record(result, time.perf_counter() - t0, mode, k)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/stream.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "work"
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    by = {(r["mode"], r["chunk"]): r for r in rows}
    chunks = sorted({r["chunk"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    lines = [
        f"`{meta['command']}`  ({meta['machine']})",
        "",
        "| chunk | images seen | " + " | ".join(f"{m} s / acc / prefix imgs" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for k in chunks:
        cells = []
        for m in modes:
            r = by.get((m, k))
            prefix = "-" if r is None or r["prefix_samples"] is None else str(r["prefix_samples"])
            cells.append("-" if r is None else f"{r['seconds']:.1f} / {100 * r['val_acc']:.1f}% / {prefix}")
        lines.append(f"| {k} | {(k + 1) * args.chunk_size} | " + " | ".join(cells) + " |")
    total = {m: sum(r["seconds"] for r in rows if r["mode"] == m) for m in modes}
    last = {m: by[(m, chunks[-1])]["val_acc"] for m in modes if (m, chunks[-1]) in by}
    lines += ["", "| mode | total s | vs retrain-none | final acc |", "|---|---|---|---|"]
    for m in modes:
        ratio = f"{total[m] / total['retrain-none']:.2f}x" if "retrain-none" in total else "-"
        lines.append(f"| {m} | {total[m]:.1f} | {ratio} | {100 * last.get(m, float('nan')):.2f}% |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in modes:
        mine = [r for r in rows if r["mode"] == m]
        clock = [sum(r["seconds"] for r in mine[: i + 1]) for i in range(len(mine))]
        a1.plot(clock, [100 * r["val_acc"] for r in mine], marker="o", label=m)
        a2.plot([r["chunk"] for r in mine], [r["seconds"] for r in mine], marker="o", label=m)
    a1.set(
        xlabel="wall-clock over the stream (s)", ylabel="val accuracy (%)", title="accuracy as chunks arrive"
    )
    a2.set(xlabel="chunk", ylabel="seconds for this chunk", title="time per chunk")
    a1.legend()
    fig.tight_layout()
    fig.savefig(OUT / "stream.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="timm:resnet18")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2, help="epochs per chunk")
    p.add_argument("--first-epochs", type=int, default=6, help="epochs of the first run (chunk 0)")
    p.add_argument(
        "--first-policy", default="fixed:layer3@2", help="the first run's policy (fxdrop --policy)"
    )
    p.add_argument(
        "--pre-epochs", type=int, default=6, help="epochs of the model's training before the stream"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--work", type=Path, default=OUT / "runs")
    args = p.parse_args()
    write_results(run_stream(args, args.work), args)


if __name__ == "__main__":
    main()
