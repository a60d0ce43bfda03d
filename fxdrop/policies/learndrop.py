"""Learn&Drop: drop the front segments once they have stopped learning (our reading of Cruciata
et al. 2024; see DESIGN.md).

The paper scores each layer by how much its parameters change and whether it will keep learning.
The first reading, raw relative change and its slope, followed the learning rate: a cosine decay
read as settling. Both scores here are invariant to the learning-rate schedule and warm-up:

    change       c_s(t)  = ||Δθ_s(t)|| / (||θ_s(t-1)|| * lr(t))       per unit of learning rate
    slowdown     r_s     = mean of the last `window` c_s / the largest c_s seen
    consistency  k_s     = mean of the last `window` cos(Δθ_s(t), Δθ_s(t-1))

`Δθ_s(t)` is the change of segment s's parameters over one observation interval (many steps).
While a segment learns, successive intervals move it the same way (k near 1); once it has
settled, what moves it is minibatch noise and successive moves are unrelated (k near 0). Scaling
every step by a learning rate changes neither r nor k.

A segment may be dropped when r < `tau` and k < `consistency`, with every segment before it, once
the network has learned something (the training loss fell by `learned` from its first
observation) and after `warmup` observations. After a drop that hurt validation accuracy beyond
its noise (the engine judges it), no further drop until validation recovers to its level before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import Policy, drop_limit, param_segments

__all__ = ["LearnDrop"]


def _flat(params: dict[str, torch.nn.Parameter], names: list[str]) -> torch.Tensor:
    return torch.cat([params[n].detach().reshape(-1).float() for n in names]).clone()


@dataclass(frozen=True)
class LearnDrop(Policy):
    """Learn&Drop scores: every constant is a field. Defaults were chosen by measurement
    (docs/benchmarks.md)."""

    interval: float = 0.25  # epochs between observations
    tau: float = 0.5  # slowdown: per-LR change below tau x its peak
    consistency: float = 0.2  # successive moves less aligned than this: moved by noise, not learning
    window: int = 2  # observations averaged in both scores
    warmup: int = 4  # observations before any drop (one epoch at the default interval)
    learned: float = 0.3  # the training loss must have fallen by this fraction before any drop
    min_trainable: int = 2  # segments with parameters that always train (the head)
    eps: float = 1e-12  # guards divisions by zero norms

    def init_state(self, segments):
        state = super().init_state(segments)
        state.update(change={s: [] for s in param_segments(state)}, cos={s: [] for s in param_segments(state)},
                     losses=[], observations=0, snapshot=None, delta=None, hold=None)
        return state

    def observe(self, state, model, lr=1.0, loss=None):
        params = dict(model.named_parameters())
        now = {s: _flat(params, state["segments"][s]) for s in param_segments(state)
               if params[state["segments"][s][0]].requires_grad}  # reason: dropped segments are final
        prev, state["snapshot"] = state["snapshot"], now
        if loss is not None:
            state["losses"].append(loss)
        if prev is None:
            return {}
        state["observations"] += 1
        deltas = {s: theta - prev[s] for s, theta in now.items() if s in prev}
        last = state["delta"] or {}
        for s, d in deltas.items():
            dn = torch.linalg.vector_norm(d).item()
            state["change"][s].append(dn / ((torch.linalg.vector_norm(prev[s]).item() + self.eps) * max(lr, self.eps)))
            if s in last:
                cos = torch.dot(d, last[s]).item() / (dn * torch.linalg.vector_norm(last[s]).item() + self.eps)
                state["cos"][s].append(cos)
        state["delta"] = deltas
        return {"change": {s: state["change"][s][-1] for s in deltas}}

    def scores(self, state: dict[str, Any], s: int) -> tuple[float, float]:
        """(slowdown r_s, consistency k_s); (inf, inf) before `window` observations of both."""
        c, k = state["change"][s], state["cos"][s]
        if len(c) < self.window or len(k) < self.window or max(c) <= 0:
            return math.inf, math.inf
        return sum(c[-self.window :]) / self.window / max(c), sum(k[-self.window :]) / self.window

    def epoch_end(self, state, record, drop=None):
        if drop is not None and drop.get("hurt"):
            state["hold"] = drop["val_acc_before"]
        elif state["hold"] is not None and record.get("val_acc") is not None and record["val_acc"] >= state["hold"]:
            state["hold"] = None

    def target(self, state, epoch, epochs, dropped):
        if state["observations"] < self.warmup:
            return dropped, {"rule": "warmup"}
        losses = state["losses"]
        if not losses or min(losses[-self.window :]) > (1 - self.learned) * losses[0]:
            return dropped, {"rule": "not learned yet", "loss_first": losses[0] if losses else None,
                             "loss_now": losses[-1] if losses else None}
        if state["hold"] is not None:
            return dropped, {"rule": "holding after a drop that hurt validation", "val_acc_to_recover": state["hold"]}
        limit = drop_limit(state, self.min_trainable)
        best, why = dropped, {}
        for s in param_segments(state):
            if s <= dropped:
                continue
            r, k = self.scores(state, s)
            if s > limit or not (r < self.tau and k < self.consistency):
                why["first_learning"] = {"segment": s, "r": round(r, 4), "k": round(k, 4)}
                break
            why[str(s)] = {"r": round(r, 4), "k": round(k, 4)}
            best = s
        return best, {"scores": why}

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        """Every observation (metrics.json): per segment its change and consistency series."""
        return {"change": {str(s): [round(v, 6) for v in h] for s, h in state["change"].items()},
                "consistency": {str(s): [round(v, 4) for v in h] for s, h in state["cos"].items()},
                "losses": [round(v, 5) for v in state["losses"]]}
