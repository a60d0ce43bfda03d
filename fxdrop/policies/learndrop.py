"""Learn&Drop: drop the front segments once they have stopped learning (our reading of Cruciata
et al. 2024; see DESIGN.md).

The paper scores each layer by how much its parameters change and whether it will keep learning.
A first reading, raw relative change and its slope, followed the learning rate: a cosine decay
read as settling. Here both are measured on the moves of a segment over an observation interval
(many steps), in ways a learning-rate schedule cannot fake:

    move         Δθ_s(t) = θ_s(t) - θ_s(t-1) of the segment's weight tensors (dim >= 2), without
                 the radial part of each
    change       c_s(t)  = ||Δθ_s(t)|| / (||θ_s(t-1)|| * lr(t))      per unit of learning rate
    consistency  k_s     = mean over the last `window` observations of cos(Δθ_s(t), Δθ_s(t-lag))

While a segment learns, its moves keep a direction (k well above 0); once it has settled,
minibatch noise moves it and moves `lag` intervals apart are unrelated (k near 0, or negative
when it bounces in a valley). Scaling the steps by any learning rate changes neither. `lag` = 2
because SGD momentum carries the end of one interval into the next (neighbouring moves measured
0.4-0.6 apart even where moves two apart were 0-0.1). The radial part is left out because a
weight followed by a normalisation is scale-invariant: weight decay shrinks it steadily, a
consistent move that is not learning. Biases and normalisation parameters are left out: a
BatchNorm's scale and shift follow the drift of its batch statistics, and in fine-tuning VGG-11-BN
the BatchNorm after the first convolution moved consistently all run (0.3-0.8) while its
convolution had settled (0.0-0.2); read with them, nothing was dropped until epoch 5 of 6, read
without them the cut reached the last convolution by epoch 4 at -0.6 pt (docs/benchmarks.md). A
segment without a weight tensor (a normalisation between two cuts) has nothing of its own to
judge: it drops with the next segment that has one. Measured on ResNet-18 (docs/benchmarks.md):
the size of the change of normalised layers follows the learning rate and weight decay, not
learning (the same 0.6-0.9 of its peak all through a fine-tune whose accuracy had settled), so it
is recorded and available as a second gate (`tau`), off by default.

A segment may be dropped when k < `consistency`, with every segment before it, once the network
has learned something (the training loss fell by `learned` from its first observation) and after
`warmup` observations. Drops are progressive: the allowance advances by at most a share
`advance` of the droppable segments with parameters (a third: three advances cross the network,
whatever its depth), then waits `hold` observations, so the scores see the new state first.
The allowance is the policy's, the cut the engine's: the step costs may decline an allowed drop
that would not pay (an early segment is cheap to train), and the allowance goes on advancing.
After a drop that hurt validation accuracy beyond its noise (the engine judges it), nothing more
is dropped until validation recovers to its level before.
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


def _cos(a: torch.Tensor, b: torch.Tensor, eps: float) -> float:
    return torch.dot(a, b).item() / (torch.linalg.vector_norm(a).item() * torch.linalg.vector_norm(b).item() + eps)


def _weights(params: dict[str, torch.nn.Parameter], names: list[str]) -> list[str]:
    """The weight tensors (dim >= 2) among `names`: what LearnDrop judges (module docstring)."""
    return [n for n in names if params[n].dim() >= 2]


def _tangential(delta: torch.Tensor, theta: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """`delta` without its radial part in every weight tensor: a weight followed by a
    normalisation is scale-invariant, and weight decay shrinks it steadily; that steady shrinking
    would read as consistent learning."""
    parts = []
    for d, t in zip(torch.split(delta, [q.numel() for q in params]), torch.split(theta, [q.numel() for q in params])):
        u = t / (torch.linalg.vector_norm(t) + 1e-12)
        parts.append(d - torch.dot(d, u) * u)
    return torch.cat(parts)


@dataclass(frozen=True)
class LearnDrop(Policy):
    """Learn&Drop scores: every constant is a field. Defaults were chosen by measurement
    (docs/benchmarks.md)."""

    interval: float = 0.25  # epochs between observations
    consistency: float = 0.2  # moves less aligned than this: moved by noise, no longer learning
    window: int = 4  # observations averaged in the scores (one epoch at the default interval)
    lag: int = 2  # consistency compares moves this many intervals apart (SGD momentum correlates neighbours)
    tau: float = math.inf  # optional second gate: per-LR change below tau x its peak (off; module docstring)
    warmup: int = 4  # observations before any drop (one epoch at the default interval)
    learned: float = 0.3  # the training loss must have fallen by this fraction before any drop
    min_trainable: int = 2  # segments with parameters that always train (the head)
    advance: float = 1 / 3  # share of the droppable segments with parameters one advance may add (at least one)
    hold: int = 4  # observations between two advances of the allowance (one epoch at the default interval)
    eps: float = 1e-12  # guards divisions by zero norms

    def init_state(self, segments):
        state = super().init_state(segments)
        state.update(change={s: [] for s in param_segments(state)}, cos={s: [] for s in param_segments(state)},
                     losses=[], observations=0, snapshot=None, deltas=[], hold=None, allowed=-1, allowed_at=None,
                     weightless=None)
        return state

    def observe(self, state, model, lr=1.0, loss=None):
        params = dict(model.named_parameters())
        weights = {s: _weights(params, state["segments"][s]) for s in param_segments(state)}
        state["weightless"] = [s for s, w in weights.items() if not w]
        now = {s: _flat(params, w) for s, w in weights.items()
               if w and params[w[0]].requires_grad}  # reason: dropped segments are final
        prev, state["snapshot"] = state["snapshot"], now
        if loss is not None:
            state["losses"].append(loss)
        if prev is None:
            return {}
        state["observations"] += 1
        # reason: a snapshot of another length was taken by a version that judged biases too (a resumed run)
        deltas = {s: _tangential(theta - prev[s], prev[s], [params[n] for n in weights[s]])
                  for s, theta in now.items() if s in prev and prev[s].numel() == theta.numel()}
        earlier = state["deltas"]  # the last `lag` intervals' moves, oldest first (bf16)
        for s, d in deltas.items():
            dn = torch.linalg.vector_norm(d).item()
            state["change"][s].append(dn / ((torch.linalg.vector_norm(prev[s]).item() + self.eps) * max(lr, self.eps)))
            if len(earlier) == self.lag and s in earlier[0] and earlier[0][s].numel() == d.numel():
                state["cos"][s].append(_cos(d, earlier[0][s].float(), self.eps))
        # reason: a move is kept only to be compared by direction: bf16 halves what the state and
        # every checkpoint hold, and the cosine of two moves of millions of values moves by ~1e-3
        state["deltas"] = [*earlier, {s: d.to(torch.bfloat16) for s, d in deltas.items()}][-self.lag :]
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
        # reason: the engine may decline an allowed drop (it would not pay yet); the allowance
        # still advances, so the cut can jump to where dropping pays once the scores reach it
        allowed = max(dropped, state.get("allowed", -1))
        if state.get("allowed_at") is not None and state["observations"] - state["allowed_at"] < self.hold:
            return allowed, {"rule": "settling after the last advance", "allowed": allowed}
        limit = drop_limit(state, self.min_trainable)
        weightless = set(state.get("weightless") or ())
        cap = max(1, round(self.advance * sum(1 for s in param_segments(state) if s <= limit and s not in weightless)))
        best, why, advanced = allowed, {}, 0
        for s in param_segments(state):
            if s <= allowed:
                continue
            if s in weightless:
                continue  # reason: nothing of its own to judge; it drops with the next segment that has one
            r, k = self.scores(state, s)
            if s > limit or not (k < self.consistency and r < self.tau):
                why["first_learning"] = {"segment": s, "r": round(r, 4), "k": round(k, 4)}
                break
            why[str(s)] = {"r": round(r, 4), "k": round(k, 4)}
            best, advanced = s, advanced + 1
            if advanced == cap:
                why["capped"] = cap
                break
        if best > allowed:
            state["allowed"], state["allowed_at"] = best, state["observations"]
        return best, {"scores": why}

    def checkpoint_state(self, state, model):
        """The snapshot of a segment's weights is left out when it equals the model's weights, as it
        does when the last observation came at the epoch's last step: the checkpoint holds them."""
        if not state["snapshot"]:
            return state
        params = dict(model.named_parameters())
        kept = {s: None if torch.equal(theta, _flat(params, _weights(params, state["segments"][s]))) else theta
                for s, theta in state["snapshot"].items()}
        return state | {"snapshot": kept}

    def restore_state(self, saved, model):
        if not saved["snapshot"]:
            return saved
        params = dict(model.named_parameters())
        whole = {s: _flat(params, _weights(params, saved["segments"][s])) if theta is None else theta
                 for s, theta in saved["snapshot"].items()}
        return saved | {"snapshot": whole}

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        """Every observation (metrics.json): per segment its change and consistency series, and the
        segments without a weight tensor (not judged)."""
        return {"change": {str(s): [round(v, 6) for v in h] for s, h in state["change"].items()},
                "consistency": {str(s): [round(v, 4) for v in h] for s, h in state["cos"].items()},
                "losses": [round(v, 5) for v in state["losses"]],
                "weightless": state.get("weightless") or []}  # reason: not judged, their series stay empty
