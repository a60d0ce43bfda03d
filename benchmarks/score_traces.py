"""The drop-criterion study: every candidate signal per segment through a whole run, and the ground
truth of when freezing each prefix is harmless (docs/benchmarks.md, "The drop criterion").

    python benchmarks/score_traces.py trace  --model resnet18 --setting scratch --epochs 30 --limit 2000
    python benchmarks/score_traces.py truth  --model resnet18 --setting scratch --epochs 30 --limit 2000 \\
        --cuts layer2 layer3 layer4.0 --at 6 12 18
    python benchmarks/score_traces.py report

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
import math
import time
from pathlib import Path

import paper_table as pt
import torch
from safetensors.torch import load_file

import fxdrop
from fxdrop.engine import loop

OUT = Path(__file__).parent / "results" / "criterion"
HORIZONS = (1, 2, 4)  # epochs over which displacement is set against path length


def setting_data(args):
    classes = [5, 6, 7, 8, 9] if args.setting == "finetune" else None
    train, _ = pt.data(args.limit, classes)
    _, val = pt.data(4 * args.val * (2 if classes else 1), classes)  # reason: >= `val` validation images
    return train, val, classes


def build(args, classes):
    torch.manual_seed(0)
    model, head = pt.make_model(args.model, 5 if classes else 10)
    lr = args.lr
    if classes:
        state = load_file(str(pt.pretrained(args.model, args.pre_limit, args.pre_epochs)))
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)}, strict=False)
        lr = args.lr * args.finetune_lr_scale
    return model, lr


def _weights(model, names):
    params = dict(model.named_parameters())
    return [n for n in names if params[n].dim() >= 2]


class Recorder(fxdrop.policies.Policy):
    """Drops nothing; records the candidate signals of every segment at every observation."""

    interval = 0.25

    def __init__(self, dg: fxdrop.DropGraph, probe: torch.Tensor) -> None:
        self.dg, self.probe = dg, probe
        self.learn = fxdrop.LearnDrop(consistency=-math.inf)
        self.rows: list[dict] = []
        self.epoch_snaps: list[dict[int, torch.Tensor]] = []
        self.path: dict[int, list[float]] = {}
        self.reps: list[dict[int, torch.Tensor]] = []
        self.lca: dict[int, float] = {}
        self.observations = 0

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
        return {"learn": self.learn.init_state(segments)}

    def _flat(self, model):
        params = dict(model.named_parameters())
        return {s: torch.cat([params[n].detach().reshape(-1).float() for n in _weights(model, self.segments[s])])
                for s in self.judged}

    @torch.no_grad()
    def _probe(self, model):
        """(B, features) activations after each judged segment's last cut on the probe batch."""
        seen, hooks = {}, []
        for s in self.judged:
            if s >= len(self.dg.cut_points) or not self.dg.cut_points[s].module:
                continue  # reason: the head has no cut after it
            mod = model.get_submodule(self.dg.cut_points[s].module)  # makes the activation at cut s

            def grab(m, a, out, s=s):
                pooled = torch.nn.functional.adaptive_avg_pool2d(out, 4) if out.dim() == 4 else out  # (B, C, 4, 4)
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

    def observe(self, state, model, lr=1.0, loss=None):
        self.learn.observe(state["learn"], model, lr, loss)
        now = self._flat(model)
        self.observations += 1
        row = {"obs": self.observations, "epoch": self.observations / 4, "lr": lr, "loss": loss, "seg": {}}
        for s in self.judged:
            d = torch.linalg.vector_norm(now[s] - self.last[s]).item()
            self.path[s].append(d)
            change, cos = state["learn"]["change"][s], state["learn"]["cos"][s]
            row["seg"][s] = {"norm": torch.linalg.vector_norm(now[s]).item(), "move": d, "lca": self.lca[s],
                             "change": change[-1] if change else None, "cos": cos[-1] if cos else None}
            self.lca[s] = 0.0
        self.last = now
        if self.observations % 4 == 0:
            self.epoch_snaps.append({s: t.to(torch.bfloat16) for s, t in now.items()})
            e = len(self.epoch_snaps) - 1
            for s in self.judged:
                for h in HORIZONS:
                    if e >= h:
                        net = torch.linalg.vector_norm(now[s] - self.epoch_snaps[e - h][s].float()).item()
                        row["seg"][s][f"net{h}"] = net
                        row["seg"][s][f"path{h}"] = sum(self.path[s][-4 * h:])
            reps = self._probe(model)
            prev = self.reps[-1]
            for s, a in reps.items():
                b = prev.get(s)
                if b is not None:
                    row["seg"][s]["rep_rel"] = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
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
    train, val, classes = setting_data(args)
    model, lr = build(args, classes)
    probe = torch.stack([val[i][0] for i in range(0, len(val), max(1, len(val) // 256))][:256])
    dg = fxdrop.trace(model, probe[:2])
    rec = Recorder(dg, probe)
    real = loop.train_step

    def step(net, x, y, opt, *a):
        before = rec._flat(model)
        loss = real(net, x, y, opt, *a)  # reason: the gradients are still there after the step
        params = dict(model.named_parameters())
        grads = {s: torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
                               .reshape(-1).float() for n in _weights(model, rec.segments[s])]) for s in rec.judged}
        rec.step_lca(grads, before, model)
        return loss

    loop.train_step = step
    try:
        res = fxdrop.fit(model, train, val, policy=rec, epochs=args.epochs, batch_size=64, lr=lr, seed=0,
                         out_dir=OUT / "runs" / f"trace-{args.model}-{args.setting}", overwrite=True)
    finally:
        loop.train_step = real
    names = {s: dg.cut_points[s].module if s < len(dg.cut_points) else "head" for s in rec.judged}
    out = {"args": vars(args), "val_acc": [h["val_acc"] for h in res.history], "segments": names,
           "params": {s: dg.segments[s].num_params for s in rec.judged}, "rows": rec.rows,
           "cuts": [{"index": cp.index, "module": cp.module, "suffix_flops": cp.suffix_flops / dg.total_flops}
                    for cp in dg.cut_points]}
    path = OUT / f"trace-{args.model}-{args.setting}-{args.epochs}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print("wrote", path)


def truth(args) -> None:
    train, val, classes = setting_data(args)
    path = OUT / f"truth-{args.model}-{args.setting}-{args.epochs}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    modes = ["none"] + [f"fixed:{c}@{e}" for c in args.cuts for e in args.at] + list(args.extra)
    for mode in modes:
        if mode in done and not args.again:
            continue
        model, lr = build(args, classes)
        t0 = time.perf_counter()
        res = fxdrop.fit(model, train, val, policy=fxdrop.policies.parse_policy(mode), epochs=args.epochs,
                         batch_size=64, lr=lr, seed=0, out_dir=OUT / "runs" / f"truth-{mode.replace(':', '-')}",
                         overwrite=True)
        done[mode] = {"wall_s": round(time.perf_counter() - t0, 2), "final_acc": res.final_val_acc,
                      "val_acc": [h["val_acc"] for h in res.history],
                      "events": [{k: e[k] for k in ("epoch", "cut", "module", "cached") if k in e} for e in res.events]}
        print(args.setting, mode, done[mode]["wall_s"], round(100 * res.final_val_acc, 2), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["trace", "truth"])
    p.add_argument("--model", default="resnet18", choices=pt.MODELS)
    p.add_argument("--setting", choices=["finetune", "scratch"], default="scratch")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--val", type=int, default=1000, help="validation images (at least)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr-scale", type=float, default=0.3)
    p.add_argument("--pre-limit", type=int, default=20000)
    p.add_argument("--pre-epochs", type=int, default=4)
    p.add_argument("--cuts", nargs="*", default=[])
    p.add_argument("--at", nargs="*", type=int, default=[])
    p.add_argument("--extra", nargs="*", default=[], help="more policies to run beside (learn-drop, freezeout:0.3)")
    p.add_argument("--again", action="store_true", help="rerun modes already recorded")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    (trace if args.what == "trace" else truth)(args)


if __name__ == "__main__":
    main()
