"""The drop-criterion study: every candidate signal per segment through a whole run, and the ground
truth of when freezing each prefix is harmless (docs/benchmarks.md, "The drop criterion").

    python benchmarks/score_traces.py trace  --model resnet18 --setting scratch --epochs 30 --limit 2000
    python benchmarks/score_traces.py truth  --model resnet18 --setting scratch --epochs 30 --limit 2000 \\
        --cuts layer2 layer3 layer4.0 --at 6 12 18
    python benchmarks/score_traces.py report
    python benchmarks/score_traces.py growth --model vgg11_bn --setting scratch --epochs 30

`trace` trains with nothing dropped and records, per segment with weights, at every observation
(a quarter epoch): the per-LR change and move consistency LearnDrop used, the loss-change
allocation (the sum over steps of <g_s, dtheta_s>: the segment's share of the training-loss
decrease), the net displacement of its weights against their path length over 1, 2 and 4 epochs,
and at every epoch end the change of the activations after it on a fixed probe batch (relative
distance and 1 - linear CKA against the epoch before). `truth` runs `fixed:CUT@N` for each cut and
epoch, and `none`, on the same setting. `report` writes the tables and a plot per setting under
benchmarks/results/criterion/.

Run it alone on the machine (`truth` records wall-clock ratios).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import paper_table as pt
import torch

import fxdrop
from fxdrop.engine import loop
from fxdrop.policies.learndrop import _tangential

OUT = Path(__file__).parent / "results" / "criterion"
HORIZONS = (1, 2, 4)  # epochs over which displacement is set against path length
BETAS = (0.5, 0.8)  # decay of the sum of earlier epochs' moves an epoch's move is projected on


def _weights(model, names):
    params = dict(model.named_parameters())
    return [n for n in names if params[n].dim() >= 2]


class Recorder(fxdrop.policies.Policy):
    """Drops nothing; records the candidate signals of every segment at every observation."""

    interval = 0.25

    def __init__(self, dg: fxdrop.DropGraph, probe: torch.Tensor) -> None:
        self.dg, self.probe = dg, probe
        self.moves: list[dict[int, torch.Tensor]] = []  # the last two intervals' moves (lag-2 consistency)
        self.rows: list[dict] = []
        self.epoch_snaps: list[dict[int, torch.Tensor]] = []
        self.path: dict[int, list[float]] = {}
        self.reps: list[dict[int, torch.Tensor]] = []
        self.lca: dict[int, float] = {}
        self.observations = 0
        self.acc: dict[tuple[int, float], torch.Tensor] = {}
        # per observation interval: sum over steps of ||g_s||^2 and of g_s, and the steps
        self.gsq: dict[int, float] = {}
        self.gsum: dict[int, torch.Tensor] = {}
        self.gsteps = 0

    def describe(self):
        return {"name": "Recorder"}

    def init_state(self, segments):
        self.segments = segments
        self.judged = [s for s, names in enumerate(segments) if names and _weights(self.dg.model, names)]
        self.path = {s: [] for s in self.judged}
        self.lca = {s: 0.0 for s in self.judged}
        self.last = self._flat(self.dg.model)
        self.epoch_snaps.append({s: t.to(torch.bfloat16) for s, t in self.last.items()})
        self.reps.append(self._probe(self.dg.model))
        return {}

    def _flat(self, model):
        params = dict(model.named_parameters())
        return {
            s: torch.cat([params[n].detach().reshape(-1).float() for n in _weights(model, self.segments[s])])
            for s in self.judged
        }

    @torch.no_grad()
    def _probe(self, model):
        """(B, features) activations after each judged segment's last cut on the probe batch."""
        seen, hooks = {}, []
        for s in self.judged:
            if s >= len(self.dg.cut_points) or not self.dg.cut_points[s].module:
                continue  # reason: the head has no cut after it
            mod = model.get_submodule(self.dg.cut_points[s].module)  # makes the activation at cut s

            def grab(m, a, out, s=s):
                pooled = (
                    torch.nn.functional.adaptive_avg_pool2d(out, 4) if out.dim() == 4 else out
                )  # (B, C, 4, 4)
                seen[s] = pooled.flatten(1).float()

            hooks.append(mod.register_forward_hook(grab))
        was = model.training
        model.eval()
        try:
            model(self.probe)
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        return seen

    def step_lca(self, grads: dict[int, torch.Tensor], before: dict[int, torch.Tensor], model) -> None:
        after = self._flat(model)
        for s in self.judged:
            if s in grads:
                self.lca[s] += torch.dot(grads[s], after[s] - before[s]).item()

    def step_grads(self, grads: dict[int, torch.Tensor]) -> None:
        """The gradient signals: the diagonal Fisher's trace (mean squared gradient norm) and the
        gradients' mean, per segment, over the interval's steps."""
        self.gsteps += 1
        for s, g in grads.items():
            self.gsq[s] = self.gsq.get(s, 0.0) + torch.dot(g, g).item()
            self.gsum[s] = self.gsum[s] + g if s in self.gsum else g.clone()

    def observe(self, state, model, lr=1.0, loss=None):
        now = self._flat(model)
        params = dict(model.named_parameters())
        self.observations += 1
        row = {"obs": self.observations, "epoch": self.observations / 4, "lr": lr, "loss": loss, "seg": {}}
        moves = {}
        for s in self.judged:
            d = torch.linalg.vector_norm(now[s] - self.last[s]).item()
            self.path[s].append(d)
            # the previous LearnDrop's scores: per-LR change, and the cosine of moves two intervals apart
            moves[s] = _tangential(
                now[s] - self.last[s], self.last[s], [params[n] for n in _weights(model, self.segments[s])]
            )
            size = torch.linalg.vector_norm(self.last[s]).item()
            cos = None
            if len(self.moves) == 2:
                a, b = moves[s], self.moves[0][s]
                cos = torch.dot(a, b).item() / (
                    torch.linalg.vector_norm(a).item() * torch.linalg.vector_norm(b).item() + 1e-12
                )
            row["seg"][s] = {
                "norm": torch.linalg.vector_norm(now[s]).item(),
                "move": d,
                "lca": self.lca[s],
                "change": torch.linalg.vector_norm(moves[s]).item() / (size * max(lr, 1e-12)),
                "cos": cos,
            }
            if self.gsteps:
                fisher = self.gsq.get(s, 0.0) / self.gsteps  # E||g_s||^2 over the interval
                mean = self.gsum[s] / self.gsteps
                row["seg"][s] |= {
                    "fisher": fisher,
                    "gmean_sq": torch.dot(mean, mean).item(),  # ||E g_s||^2: the signal part
                    "params": now[s].numel(),
                }
            self.lca[s] = 0.0
        self.gsq, self.gsum, self.gsteps = {}, {}, 0
        self.moves = [*self.moves, moves][-2:]
        self.last = now
        if self.observations % 4 == 0:
            start = self.epoch_snaps[-1]
            self.epoch_snaps.append({s: t.to(torch.bfloat16) for s, t in now.items()})
            e = len(self.epoch_snaps) - 1
            params = dict(model.named_parameters())
            for s in self.judged:  # the epoch's move against the (decayed) sum of the earlier ones
                move = _tangential(
                    now[s] - start[s].float(),
                    start[s].float(),
                    [params[n] for n in _weights(model, self.segments[s])],
                )
                for beta in BETAS:
                    acc = self.acc.setdefault((s, beta), torch.zeros_like(move))
                    norm = torch.linalg.vector_norm(acc).item()
                    row["seg"][s][f"along{beta}"] = torch.dot(move, acc).item() / norm if norm > 0 else None
                    self.acc[(s, beta)] = beta * acc + move
                row["seg"][s]["epoch_move"] = torch.linalg.vector_norm(move).item()
            for s in self.judged:
                for h in HORIZONS:
                    if e >= h:
                        net = torch.linalg.vector_norm(now[s] - self.epoch_snaps[e - h][s].float()).item()
                        row["seg"][s][f"net{h}"] = net
                        row["seg"][s][f"path{h}"] = sum(self.path[s][-4 * h :])
            reps = self._probe(model)
            prev = self.reps[-1]
            for s, a in reps.items():
                b = prev.get(s)
                if b is not None:
                    row["seg"][s]["rep_rel"] = (
                        torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)
                    ).item()
                    row["seg"][s]["rep_cka"] = 1 - _cka(a, b)
            self.reps.append(reps)
        self.rows.append(row)
        return {}

    def target(self, state, epoch, epochs, dropped):
        return -1, {}


def _cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two (n, features) representations of the same n samples."""
    a, b = a - a.mean(0), b - b.mean(0)
    num = torch.linalg.matrix_norm(b.T @ a) ** 2
    den = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    return (num / den).item()


def trace(args) -> None:
    train, val = pt.setting_data(args.setting, args.limit, args.val)
    model, lr = pt.setting_model(args.model, args.setting, args)
    probe = torch.stack([val[i][0] for i in range(0, len(val), max(1, len(val) // 256))][:256])
    dg = fxdrop.trace(model, probe[:2])
    rec = Recorder(dg, probe)
    real = loop.train_step

    def step(net, x, y, opt, *a):
        before = rec._flat(model)
        loss = real(net, x, y, opt, *a)  # reason: the gradients are still there after the step
        params = dict(model.named_parameters())
        grads = {
            s: torch.cat(
                [
                    (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
                    .reshape(-1)
                    .float()
                    for n in _weights(model, rec.segments[s])
                ]
            )
            for s in rec.judged
        }
        rec.step_lca(grads, before, model)
        rec.step_grads(grads)
        return loss

    loop.train_step = step
    try:
        res = fxdrop.fit(
            model,
            train,
            val,
            policy=rec,
            epochs=args.epochs,
            batch_size=64,
            lr=lr,
            seed=0,
            out_dir=OUT / "runs" / f"trace-{args.model}-{args.setting}",
            overwrite=True,
        )
    finally:
        loop.train_step = real
    names = {s: dg.cut_points[s].module if s < len(dg.cut_points) else "head" for s in rec.judged}
    out = {
        "args": vars(args),
        "val_acc": [h["val_acc"] for h in res.history],
        "segments": names,
        "params": {s: dg.segments[s].num_params for s in rec.judged},
        "rows": rec.rows,
        "cuts": [
            {"index": cp.index, "module": cp.module, "suffix_flops": cp.suffix_flops / dg.total_flops}
            for cp in dg.cut_points
        ],
    }
    path = OUT / f"trace-{args.model}-{args.setting}-{args.epochs}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print("wrote", path)


def truth(args) -> None:
    train, val = pt.setting_data(args.setting, args.limit, args.val)
    path = OUT / f"truth-{args.model}-{args.setting}-{args.epochs}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    modes = ["none"] + [f"fixed:{c}@{e}" for c in args.cuts for e in args.at] + list(args.extra)
    if args.landing:  # the grid with landing: the fixed drops again, each landed over the epochs before it
        modes = [m for m in modes if m != "none"]
    for mode in modes:
        key = mode if not args.landing else f"{mode}+land{args.landing:g}"
        key += f"@seed{args.seed}" if args.seed else ""  # another data order and augmentation
        if key in done and not args.again:
            continue
        model, lr = pt.setting_model(args.model, args.setting, args)
        t0 = time.perf_counter()
        res = fxdrop.fit(
            model,
            train,
            val,
            policy=fxdrop.policies.parse_policy(mode),
            epochs=args.epochs,
            batch_size=64,
            lr=lr,
            seed=args.seed,
            landing=args.landing,
            out_dir=OUT / "runs" / f"truth-{args.setting}-{key.replace(':', '-')}",
            overwrite=True,
        )
        result = {
            "wall_s": round(time.perf_counter() - t0, 2),
            "final_acc": res.final_val_acc,
            "val_acc": [h["val_acc"] for h in res.history],
            "events": [{k: e[k] for k in ("epoch", "cut", "module", "cached") if k in e} for e in res.events],
        }
        print(args.setting, key, result["wall_s"], round(100 * res.final_val_acc, 2), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        done = json.loads(path.read_text()) if path.exists() else done  # another process may have added modes
        done[key] = result
        path.write_text(json.dumps(done, indent=1))


def signals(trace: dict, memory: str = "0.8") -> dict[str, dict[str, list[float | None]]]:
    """Per judged segment, per epoch (index e: after epoch e + 1), every candidate signal, each
    oriented so that large means "still learning":
      consistency  the previous LearnDrop's k: mean lag-2 cosine of the epoch's quarter-epoch moves
      directed4    net displacement over 4 epochs / path length (quarter-epoch moves) over them
      lca          the segment's share of the epoch's loss-change allocation (its share of the
                   first-order training-loss decrease)
      rep          relative change of the activations after it on the probe batch over the epoch
      cka          1 - linear CKA of those activations against the epoch before
      share_left   the forecast of LearnDrop's criterion: the learning to come over the learning so
                   far (interval 1 epoch, `memory`, window 2)
      slowdown     its speed over its mean speed so far
      aim          the share of its epoch's move that goes on in its direction (mean of two epochs)"""
    rows = trace["rows"]
    epochs = [r for r in rows if r["obs"] % 4 == 0]
    lr_epoch = [sum(r["lr"] for r in rows[4 * e : 4 * e + 4]) / 4 for e in range(len(epochs))]
    out: dict[str, dict[str, list]] = {}
    for s in trace["segments"]:
        sig = {k: [] for k in SIGNALS}
        learnt, used, speeds, aims = 0.0, 0.0, [], []
        for e, r in enumerate(epochs):
            x = r["seg"][s]
            quarter = [q["seg"][s] for q in rows[4 * e : 4 * e + 4]]
            cos = [q["cos"] for q in quarter if q.get("cos") is not None]
            sig["consistency"].append(sum(cos) / len(cos) if cos else None)
            sig["directed4"].append(x["net4"] / x["path4"] if "net4" in x and x["path4"] > 0 else None)
            total = sum(
                abs(q["lca"])
                for q in (rows[4 * e + j]["seg"][t] for j in range(4) for t in trace["segments"])
            )
            sig["lca"].append(-sum(q["lca"] for q in quarter) / total if total else None)
            sig["rep"].append(x.get("rep_rel"))
            sig["cka"].append(x.get("rep_cka"))
            along = x.get(f"along{memory}")
            rel = (x["epoch_move"] if along is None else along) / x["norm"]
            if along is not None:
                aims.append(along / x["epoch_move"])
            sig["aim"].append(sum(aims[-2:]) / 2 if len(aims) >= 2 else None)
            learnt += max(rel, 0.0)
            used += lr_epoch[e]
            speeds.append(rel / max(lr_epoch[e], 1e-12))
            speed = sum(speeds[-2:]) / 2 if len(speeds) >= 2 else None
            left = sum(lr_epoch[e + 1 :])
            sig["share_left"].append(
                max(speed, 0.0) * left / learnt if speed is not None and learnt > 0 else None
            )
            sig["slowdown"].append(speed / (learnt / used) if speed is not None and learnt > 0 else None)
        out[s] = sig
    return out


def prefix_value(trace: dict, sig: dict, cut_module: str, name: str, e: int) -> float | None:
    """The largest value of signal `name` after epoch e + 1 over the judged segments up to the cut
    (a prefix is settled only when all of it is)."""
    order = list(trace["segments"])
    last = next(
        s
        for s in order
        if trace["segments"][s] == cut_module or trace["segments"][s].startswith(cut_module + ".")
    )
    upto = order[: order.index(last) + 1]
    if cut_module in ("layer2", "layer3"):  # reason: the cut after a stage includes all its blocks
        upto = [
            s
            for s in order
            if order.index(s)
            <= max(order.index(t) for t in order if trace["segments"][t].startswith(cut_module))
        ]
    vals = [sig[s][name][e] for s in upto if sig[s][name][e] is not None]
    return max(vals) if vals else None


def report(args) -> None:
    lines = ["# The drop criterion: signals against the ground truth", ""]
    for trace_path in sorted(OUT.glob("trace-*.json")):
        trace = json.loads(trace_path.read_text())
        model, setting, epochs = trace_path.stem.split("-")[1:4]
        truth_path = OUT / f"truth-{model}-{setting}-{epochs}.json"
        sig = signals(trace)
        lines += [f"## {model}, {setting}, {epochs} epochs ({trace['args']['limit']} training images)", ""]
        if truth_path.exists():
            truth = json.loads(truth_path.read_text())
            base = truth["none"]
            lines += [
                f"none: {100 * base['final_acc']:.2f}% in {base['wall_s']:.0f} s",
                "",
                "| fixed drop | wall-clock vs none | accuracy vs none | " + " | ".join(SIGNALS) + " |",
                "|---|---|---|" + "---|" * len(SIGNALS),
            ]
            for mode, r in truth.items():
                if not mode.startswith("fixed:"):
                    continue
                cut, at = mode[len("fixed:") :].split("@")
                vals = [prefix_value(trace, sig, cut, name, int(at) - 1) for name in SIGNALS]
                cells = " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
                lines.append(
                    f"| {cut}@{at} | {r['wall_s'] / base['wall_s']:.2f}x | "
                    f"{100 * (r['final_acc'] - base['final_acc']):+.2f} pt | {cells} |"
                )
            others = [m for m in truth if m != "none" and not m.startswith("fixed:")]
            for mode in others:
                r = truth[mode]
                drops = (
                    ", ".join(f"{e['module']}@{e['epoch'] - 1}" for e in r["events"]) or "none"
                )  # after N epochs
                lines.append(
                    f"\n{mode}: {r['wall_s'] / base['wall_s']:.2f}x, "
                    f"{100 * (r['final_acc'] - base['final_acc']):+.2f} pt; drops {drops}"
                )
            lines.append("")
        lines += [
            "LearnDrop's allowance replayed on this trace (module@epochs after which it may drop):",
            "",
            "| left | aimless 0.3 |",
            "|---|---|",
        ]
        for left in (0.01, 0.02, 0.03, 0.05, 0.1, 0.2):
            drops = ", ".join(f"{m}@{e}" for m, e in replay(trace, sig, left, 0.3)) or "none"
            lines.append(f"| {left} | {drops} |")
        lines += [
            "",
            "Per segment, LearnDrop's share of learning left after each epoch (settled below `left`):",
            "",
            "| segment | " + " | ".join(str(e + 1) for e in range(int(epochs))) + " |",
            "|---|" + "---|" * int(epochs),
        ]
        for s, name in trace["segments"].items():
            vals = sig[s]["share_left"]
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
        lines.append("")
        _plot(trace, sig, OUT / f"{model}-{setting}-{epochs}.png")
    (OUT / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


SIGNALS = ("consistency", "directed4", "lca", "rep", "cka", "share_left", "slowdown", "aim")


def replay(trace: dict, sig: dict, left: float, aimless: float) -> list[tuple[str, int]]:
    """Where LearnDrop(left, aimless) would allow the cut, epoch by epoch, on this trace: the
    (module, epoch) of each advance of the allowance, before the engine's step costs (epochs from 1:
    "layer4.0@19" drops after 19 epochs). The last two segments with weights always train."""
    order = list(trace["segments"])[:-2]
    epochs = len(sig[order[0]]["share_left"])
    allowed, out = -1, []
    for e in range(epochs - 1):
        k = -1
        for i, s in enumerate(order):
            sl, aim = sig[s]["share_left"][e], sig[s]["aim"][e]
            if sl is None or aim is None or not (sl < left and aim < aimless):
                break
            k = i
        if k > allowed:
            allowed = k
            out.append((trace["segments"][order[k]], e + 1))
    return out


def _plot(trace: dict, sig: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 10), squeeze=False)
    epochs = range(1, len(next(iter(sig.values()))["share_left"]) + 1)
    for ax, name in zip(axes.flat, SIGNALS):
        for s, label in trace["segments"].items():
            ys = [float("nan") if v is None else v for v in sig[s][name]]
            ax.plot(epochs, ys, label=label)
        ax.set(title=name, xlabel="epoch")
        if name in ("share_left", "rep", "cka", "slowdown"):
            ax.set_yscale("symlog", linthresh=0.01)
    axes.flat[-1].plot(epochs, [100 * a for a in trace["val_acc"]], color="k")
    axes.flat[-1].set(title="val accuracy (%)", xlabel="epoch")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def growth(args) -> None:
    """Per segment, at some epochs: the weights' norm, LearnDrop's per-LR change and the change of
    the representation after the segment on the probe batch: does a falling per-LR change follow
    the weights' growth (BatchNorm makes a convolution's scale irrelevant to the loss, and its
    change per unit of learning rate falls as its norm grows) while what it computes still moves?"""
    path = OUT / f"trace-{args.model}-{args.setting}-{args.epochs}.json"
    trace = json.loads(path.read_text())
    at = [e for e in (args.at or [1, 2, 4, 6, 10, 20, args.epochs]) if e <= args.epochs]
    by_epoch = {}
    for row in trace["rows"]:
        by_epoch.setdefault(int(row["epoch"] + 0.75), []).append(
            row
        )  # reason: observations 4e-3..4e are epoch e
    lines = [
        f"# {args.model}, {args.setting}, {args.epochs} epochs: weight growth against change",
        "",
        f"`python benchmarks/score_traces.py growth --model {args.model} --setting {args.setting} "
        f"--epochs {args.epochs}` on `{path.name}`. Per epoch: norm of the segment's weights, relative to epoch 1; "
        "per-LR change (mean of the epoch's observations, as LearnDrop's earlier score), and that change times "
        "(norm / norm at epoch 1)^2 (what it would be without the growth, for weights whose scale BatchNorm "
        "removes); relative change of the activations after the segment on the probe batch over the epoch.",
        "",
        "| segment | " + " | ".join(f"epoch {e}" for e in at) + " |",
        "|---|" + "---|" * len(at),
    ]
    for s, name in trace["segments"].items():
        rows = {e: [r["seg"][s] for r in by_epoch.get(e, []) if s in r["seg"]] for e in at}
        if not rows[at[0]]:
            continue
        n0 = rows[at[0]][-1]["norm"]
        cells = []
        for e in at:
            if not rows[e]:
                cells.append("-")
                continue
            norm = rows[e][-1]["norm"] / n0
            changes = [r["change"] for r in rows[e] if r.get("change") is not None]
            change = sum(changes) / max(len(changes), 1)
            rep = rows[e][-1].get("rep_rel")
            cells.append(
                f"{norm:.2f} / {change:.3f} / {change * norm**2:.3f} / "
                + (f"{rep:.3f}" if rep is not None else "-")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nEach cell: norm / per-LR change / change x norm^2 / representation change.")
    out = OUT / f"growth-{args.model}-{args.setting}-{args.epochs}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["trace", "truth", "report", "growth", "gradients"])
    p.add_argument("--model", default="resnet18", choices=pt.MODELS)
    p.add_argument("--setting", choices=["scratch", *pt.FINETUNES], default="scratch")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--val", type=int, default=1000, help="validation images (at least)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr-scale", type=float, default=0.3)
    p.add_argument("--pre-limit", type=int, default=20000)
    p.add_argument("--pre-epochs", type=int, default=4)
    p.add_argument("--cuts", nargs="*", default=[])
    p.add_argument("--at", nargs="*", type=int, default=[])
    p.add_argument(
        "--extra", nargs="*", default=[], help="more policies to run beside (learn-drop, freezeout:0.3)"
    )
    p.add_argument("--again", action="store_true", help="rerun modes already recorded")
    p.add_argument("--seed", type=int, default=0, help="truth: the runs' seed (data order, augmentation)")
    p.add_argument(
        "--landing",
        type=float,
        default=0.0,
        help="truth: epochs over which each fixed drop lands before its epoch (0: frozen at once, as before)",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"trace": trace, "truth": truth, "report": report, "growth": growth, "gradients": gradients}[args.what](
        args
    )


GRAD_CUTS = ("layer1", "layer2", "layer3", "layer4.0")


def gradient_table(trace: dict) -> list[str]:
    """Per epoch, for each cut: the prefix's share of the gradient energy (the diagonal Fisher's
    trace, E||g||^2), of the gradient signal (||E g||^2 over a quarter epoch, less its noise floor
    E||g||^2 / steps), and its largest relative gradient norm sqrt(E||g||^2) / ||theta|| against
    the head's; the prefix's share of the training FLOPs in the header."""
    rows, segs = trace["rows"], list(trace["segments"])
    steps = max(
        1, -(-trace["args"]["limit"] // (2 if trace["args"]["setting"] != "scratch" else 1) // 64) // 4
    )
    flops = {c["module"]: 1 - c["suffix_flops"] for c in trace["cuts"]}
    ends = {}
    for cut in GRAD_CUTS:
        inside = [
            s for s in segs if trace["segments"][s] == cut or trace["segments"][s].startswith(cut + ".")
        ]
        ends[cut] = segs.index(inside[-1])
    head = segs[-1]
    lines = [
        "| epoch | " + " | ".join(f"{c} ({100 * flops.get(c, 0):.0f}% FLOPs)" for c in GRAD_CUTS) + " |",
        "|---|" + "---|" * len(GRAD_CUTS),
    ]
    for e in range(len(rows) // 4):
        quarter = rows[4 * e : 4 * e + 4]
        fisher = {s: sum(q["seg"][s].get("fisher", 0.0) for q in quarter) / 4 for s in segs}
        signal = {
            s: max(
                sum(
                    q["seg"][s].get("gmean_sq", 0.0) - q["seg"][s].get("fisher", 0.0) / steps for q in quarter
                )
                / 4,
                0.0,
            )
            for s in segs
        }
        rgn = {s: fisher[s] ** 0.5 / rows[4 * e + 3]["seg"][s]["norm"] for s in segs}
        cells = []
        for cut in GRAD_CUTS:
            pre = segs[: ends[cut] + 1]
            f = sum(fisher[s] for s in pre) / max(sum(fisher.values()), 1e-30)
            g = sum(signal[s] for s in pre) / max(sum(signal.values()), 1e-30)
            r = max(rgn[s] for s in pre) / max(rgn[head], 1e-30)
            cells.append(f"{f:.2f} / {g:.2f} / {r:.2f}")
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return lines


def gradients(args) -> None:
    out = ["# Gradient signals per prefix: Fisher share / signal share / max RGN over the head's", ""]
    for path in sorted(OUT.glob("trace-*.json")):
        trace = json.loads(path.read_text())
        if "fisher" not in trace["rows"][0]["seg"][next(iter(trace["segments"]))]:
            continue
        out += [f"## {path.stem}", "", *gradient_table(trace), ""]
    (OUT / "gradients.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
