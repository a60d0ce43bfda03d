"""Learn&Drop: drop the front segments once what they would still learn is small (our reading of
Cruciata et al. 2024; see DESIGN.md and the study in docs/benchmarks.md, "The drop criterion").

The paper keeps two scores per layer: how much its parameters change, and whether it will keep
learning. Here both become one forecast, read from the segment's own moves and the run's
remaining schedule:

    move       dθ_s(t) = θ_s(t) - θ_s(t-1) of the segment's weight tensors (dim >= 2) over an
               observation interval, without the radial part of each tensor
    past       P_s(t)  = memory * P_s(t-1) + dθ_s(t): the earlier moves, the older the less
    directed   a_s(t)  = <dθ_s(t), P_s(t-1)> / ||P_s(t-1)|| / ||θ_s||: how far the move went on in
               the direction the segment has been learning in, relative to its size (the first
               move counts whole)
    speed      v_s(t)  = a_s(t) / (lr(t) * interval): directed travel per unit of learning rate
    learnt     L_s     = the sum of the directed travel so far (positive parts)
    forecast   F_s     = mean of the last `window` speeds * the learning rate still to come

A segment has settled when F_s < left_s * L_s: what it is forecast to learn in the rest of the
run is less than that share of what it has learned (left_s runs from `left_front` at the first
droppable segment to `left` at the last, geometrically: freezing deeper costs more, measured),
and its moves have lost their aim: the mean over the last `window` observations of
a_s * ||θ_s|| / ||dθ_s|| (the share of a move that goes on in the segment's direction) is below
`aimless`. A front that starts from trained weights (`trained_front`: a fine-tune; `finetune` sets
it when it loads weights) settles below `trained_left` instead, every segment alike: from scratch
an early freeze costs most, while in the fine-tunes measured a freeze after half the run cost
nothing measurable (docs/benchmarks.md, "Fine-tuning pace"). Whatever the forecasts say, nothing
drops before `wait` of the run's learning rate (in LR-epochs, the run's schedule told) is used:
every drop measured before that point cost 1-5 pt, from scratch and on inverted images (a cosine
schedule uses 80% of its learning rate by about 47% of its epochs). A segment that learns at a
steady speed keeps its aim and is never dropped, however little of the run is left; and when the
learning rate anneals at the end of a run, moves regain their aim (the noise shrinks, the descent
goes on), which is learning too. While a segment learns, its moves go on in one
direction, and F_s stays a large share of L_s; once it has settled, minibatch noise moves it across
and back (a_s near 0, or below when it returns), and F_s falls to nothing. A learning-rate decay
changes neither the speed (it is per unit of learning rate) nor L_s; it changes only what is left
to come, which is what the forecast is for: the same state is worth freezing at epoch 10 of 12 and
not at epoch 10 of 40. No constant sets the epoch of a drop: `wait` is a share of the run's
learning rate, not an epoch, and after it a drop comes when the segment's own forecast says so.

The radial part is left out because a weight followed by a normalisation is scale-invariant:
weight decay shrinks it steadily, a directed move that is not learning. Biases and normalisation
parameters are left out too: a BatchNorm's scale and shift follow the drift of its batch
statistics. A segment without a weight tensor has nothing of its own to judge: it drops with the
next segment that has one.

The cut may advance over the leading settled segments (front to back: only a prefix's forward can
be skipped), once the network has learned something (the training loss fell by `learned` from its
first observation), leaving `min_trainable` segments with parameters. The allowance is the
policy's, the cut the engine's: the step costs may decline an allowed drop that would not pay. After
a drop that hurt validation accuracy beyond its noise (the engine judges it), nothing more is
dropped until validation recovers to its level before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Policy, drop_limit, param_segments

__all__ = ["LearnDrop"]


def _flat(params: dict[str, torch.nn.Parameter], names: list[str]) -> torch.Tensor:
    return torch.cat([params[n].detach().reshape(-1).float() for n in names]).clone()


def _weights(params: dict[str, torch.nn.Parameter], names: list[str]) -> list[str]:
    """The weight tensors (dim >= 2) among `names`: what LearnDrop judges (module docstring)."""
    return [n for n in names if params[n].dim() >= 2]


def _tangential(delta: torch.Tensor, theta: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """`delta` without its radial part in every weight tensor: a weight followed by a
    normalisation is scale-invariant, and weight decay shrinks it steadily; that steady shrinking
    would read as directed learning."""
    parts = []
    for d, t in zip(
        torch.split(delta, [q.numel() for q in params]), torch.split(theta, [q.numel() for q in params])
    ):
        u = t / (torch.linalg.vector_norm(t) + 1e-12)
        parts.append(d - torch.dot(d, u) * u)
    return torch.cat(parts)


@dataclass(frozen=True)
class LearnDrop(Policy):
    """Learn&Drop's forecast of what each segment would still learn; every constant is a field.
    The defaults were chosen on part of the study in docs/benchmarks.md and reported on the rest."""

    interval: float = 1.0  # epochs between observations (an observation is one pass over the weights)
    left: float = 0.01  # settled: forecast learning to come below this share of the learning so far ...
    left_front: float | None = 0.05  # ... for the first segment, `left` for the last one that may drop,
    # between them geometrically (None: `left` for every segment): freezing deeper costs more
    # ... and its moves going on in its direction by less than this share of their length
    aimless: float = 0.3
    memory: float = 0.8  # per observation, the weight of the earlier moves a move is compared with
    window: int = 2  # observations whose speeds are averaged into the forecast
    # a front that starts from trained weights (a fine-tune) has settled below this share, every
    # segment alike: there, a freeze after half the run cost nothing measurable (measured)
    trained_left: float = 0.2
    # the model starts from trained weights (`finetune` sets it when it loads them)
    trained_front: bool = False
    # nothing drops before this share of the run's learning rate (LR-epochs) is used: every drop
    # measured before it cost 1-5 pt (from scratch, VGG's too, and on inverted images), measured
    wait: float = 0.8
    learned: float = 0.3  # the training loss must have fallen by this fraction before any drop
    min_trainable: int = 2  # segments with parameters that always train (the head)
    eps: float = 1e-12  # guards divisions by zero norms

    def init_state(self, segments):
        state = super().init_state(segments)
        judged = param_segments(state)
        state.update(
            speed={s: [] for s in judged},
            aim={s: [] for s in judged},
            learnt={s: 0.0 for s in judged},
            past={},
            snapshot=None,
            losses=[],
            observations=0,
            lr=None,
            lr_left=None,
            lr_used=0.0,
            hold=None,
            weightless=None,
        )
        return state

    def begin(self, state, model):
        self._snapshot(state, dict(model.named_parameters()))

    def _snapshot(
        self, state: dict[str, Any], params: dict[str, torch.nn.Parameter]
    ) -> dict[int, torch.Tensor]:
        weights = {s: _weights(params, state["segments"][s]) for s in param_segments(state)}
        state["weightless"] = [s for s, w in weights.items() if not w]
        now = {
            s: _flat(params, w) for s, w in weights.items() if w and params[w[0]].requires_grad
        }  # dropped segments are final
        prev, state["snapshot"] = state["snapshot"], now
        return prev

    def plan(self, state, lr_left):
        state["lr_left"] = lr_left

    def observe(self, state, model, lr=1.0, loss=None):
        params = dict(model.named_parameters())
        prev = self._snapshot(state, params)
        if loss is not None:
            state["losses"].append(loss)
        state["lr_used"] = state.get("lr_used", 0.0) + lr * self.interval  # LR-epochs so far
        if prev is None:
            return {}
        state["observations"] += 1
        state["lr"] = lr
        directed = {}
        for s, theta in state["snapshot"].items():
            if s not in prev or prev[s].numel() != theta.numel():
                continue  # a snapshot of another layout (a resumed run of an older version)
            move = _tangential(
                theta - prev[s], prev[s], [params[n] for n in _weights(params, state["segments"][s])]
            )
            size = torch.linalg.vector_norm(prev[s]).item() + self.eps
            length = torch.linalg.vector_norm(move).item()
            past = state["past"].get(s)
            if past is None:
                along = length  # nothing to compare the first move with
            else:
                past = past.float()
                along = torch.dot(move, past).item() / (torch.linalg.vector_norm(past).item() + self.eps)
                state["aim"][s].append(along / (length + self.eps))
            directed[s] = along / size
            state["learnt"][s] += max(directed[s], 0.0)
            state["speed"][s].append(directed[s] / max(lr * self.interval, self.eps))
            # kept only to be compared by direction, so bf16 (a half of what fp32 holds)
            state["past"][s] = (move if past is None else self.memory * past + move).to(torch.bfloat16)
        state["past"] = {s: p for s, p in state["past"].items() if s in state["snapshot"]}  # dropped: final
        return {"directed": directed}

    def recent(self, series: list[float]) -> float | None:
        """The mean of the last `window` values of a segment's series; None before there are as many."""
        return sum(series[-self.window :]) / self.window if len(series) >= self.window else None

    def threshold(self, i: int, n: int) -> float:
        """The share of learning left under which the i-th of n droppable segments has settled."""
        if self.trained_front:
            return self.trained_left
        if self.left_front is None or n < 2:
            return self.left
        return self.left_front * (self.left / self.left_front) ** (i / (n - 1))

    def epoch_end(self, state, record, drop=None):
        if drop is not None and drop.hurt:
            state["hold"] = drop.val_acc_before
        elif state["hold"] is not None and record.val_acc is not None and record.val_acc >= state["hold"]:
            state["hold"] = None

    def furthest(self, state):
        return drop_limit(state, self.min_trainable)

    def _not_yet(self, state: dict[str, Any], lr_left: float) -> dict[str, Any] | None:
        """Why nothing may drop yet, whatever the forecasts say; None: the forecasts decide."""
        losses = state["losses"]
        if not losses or min(losses[-self.window :]) > (1 - self.learned) * losses[0]:
            return {
                "rule": "not learned yet",
                "loss_first": losses[0] if losses else None,
                "loss_now": losses[-1] if losses else None,
            }
        if state["hold"] is not None:
            return {"rule": "holding after a drop that hurt validation", "val_acc_to_recover": state["hold"]}
        used = state.get("lr_used", 0.0)
        if used < self.wait * (used + lr_left):
            return {
                "rule": "waiting for the run's learning rate",
                "lr_used_share": round(used / max(used + lr_left, self.eps), 4),
            }
        return None

    def target(self, state, epoch, epochs, dropped):
        # without the engine's schedule (your own loop), the last rate for the epochs left
        lr_left = (
            state["lr_left"]
            if state["lr_left"] is not None
            else (state["lr"] or 0.0) * max(epochs - epoch, 0)
        )
        wait = self._not_yet(state, lr_left)
        if wait is not None:
            return dropped, wait
        limit = drop_limit(state, self.min_trainable)
        weightless = set(state["weightless"] or ())
        droppable = [s for s in param_segments(state) if s <= limit and s not in weightless]
        best, scores = dropped, {}
        why: dict[str, Any] = {"rule": "forecast", "lr_left": round(lr_left, 6), "scores": scores}
        for s in param_segments(state):
            if s <= dropped or s in weightless:
                continue  # a weightless segment has nothing of its own; it drops with the next
            if s > limit:
                why["stopped_at"] = {"segment": s, "reason": "the head always trains"}
                break
            speed, aim, learnt = (
                self.recent(state["speed"][s]),
                self.recent(state["aim"][s]),
                state["learnt"][s],
            )
            if speed is None or aim is None:
                why["stopped_at"] = {"segment": s, "reason": "not observed long enough"}
                break
            ahead = max(speed, 0.0) * lr_left  # the directed travel forecast for the rest of the run
            left = self.threshold(droppable.index(s), len(droppable))
            scores[str(s)] = {
                "forecast": round(ahead, 6),
                "learnt": round(learnt, 6),
                "aim": round(aim, 4),
                "left": round(left, 5),
            }
            if not (ahead < left * learnt and aim < self.aimless):
                why["stopped_at"] = {
                    "segment": s,
                    "reason": "still learning",
                    "left": round(left, 5),
                    "share_left": round(ahead / max(learnt, self.eps), 4),
                    "aim": round(aim, 4),
                }
                break
            best = s
        return best, why

    def reason(self, why, name):
        stop = why.get("stopped_at")
        if why.get("rule") == "waiting for the run's learning rate":
            return (
                f"{why['lr_used_share']:.0%} of the run's learning rate is used; nothing drops before "
                f"{self.wait:.0%}"
            )
        if why.get("rule") != "forecast" or stop is None:
            return {
                "not learned yet": f"the training loss has not yet fallen by {self.learned:.0%} from its first value",
            }.get(why.get("rule"), str(why.get("rule", "nothing to drop")))
        seg = name(stop["segment"])
        if stop["reason"] == "still learning":
            return (
                f"{seg} is still learning: {stop['share_left']:.0%} of what it has learned is forecast to come, "
                f"its moves {stop['aim']:.0%} on its course (it settles below {stop['left']:.0%} and "
                f"{self.aimless:.0%})"
            )
        if stop["reason"] == "not observed long enough":
            return f"{seg} was not observed long enough ({self.window} observations, one every {self.interval} epoch)"
        return f"{seg}: {stop['reason']}"

    def checkpoint_state(self, state, model):
        """The snapshot of a segment's weights is left out when it equals the model's weights, as it
        does when the last observation came at the epoch's last step: the checkpoint holds them."""
        if not state["snapshot"]:
            return state
        params = dict(model.named_parameters())
        kept = {
            s: None if torch.equal(theta, _flat(params, _weights(params, state["segments"][s]))) else theta
            for s, theta in state["snapshot"].items()
        }
        return state | {"snapshot": kept}

    def restore_state(self, saved, model):
        if not saved["snapshot"]:
            return saved
        params = dict(model.named_parameters())
        whole = {
            s: _flat(params, _weights(params, saved["segments"][s])) if theta is None else theta
            for s, theta in saved["snapshot"].items()
        }
        return saved | {"snapshot": whole}

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        """Every observation (metrics.json): per segment its speed and aim series and its learning
        so far, and the segments without a weight tensor (not judged)."""
        return {
            "speed": {str(s): [round(v, 6) for v in h] for s, h in state["speed"].items()},
            "aim": {str(s): [round(v, 4) for v in h] for s, h in state["aim"].items()},
            "learnt": {str(s): round(v, 6) for s, v in state["learnt"].items()},
            "losses": [round(v, 5) for v in state["losses"]],
            "weightless": state["weightless"] or [],
        }  # not judged, their series stay empty
