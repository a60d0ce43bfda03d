"""AutoFreeze-style policy (Liu et al. 2021; PipeTransformer uses the same test): a segment may
freeze when the change rate of its gradient norm falls below a percentile of the change rates of
all segments still training, front to back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, drop_limit, param_segments

__all__ = ["AutoFreeze"]


@dataclass(frozen=True)
class AutoFreeze(Policy):
    """Gradient-norm change against a percentile.

    Every `interval` the gradient norm of each trainable segment is read (from the step just
    taken); `window` readings are averaged into one evaluation (AutoFreeze accumulates over its
    evaluation interval). Change rate `δ_s = |g_s(e) - g_s(e-1)| / g_s(e-1)` between successive
    evaluations; the leading segments with `δ_s` below the `percentile` of all trainable segments'
    rates may freeze.
    """

    interval: float = 0.05  # epochs between gradient-norm readings
    window: int = 5  # readings per evaluation (one evaluation every 0.25 epoch by default)
    percentile: float = 50.0  # AutoFreeze's N
    warmup: int = 4  # evaluations before any drop
    min_trainable: int = 2  # segments with parameters that always train (the head)

    def init_state(self, segments):
        state = super().init_state(segments)
        state.update(
            readings={s: [] for s in param_segments(state)},
            norms={s: [] for s in param_segments(state)},
            evaluations=0,
        )
        return state

    def observe(self, state, model, lr=1.0, loss=None):
        params = dict(model.named_parameters())
        for s in param_segments(state):
            grads = [
                params[n].grad
                for n in state["segments"][s]
                if params[n].requires_grad and params[n].grad is not None
            ]
            if grads:
                state["readings"][s].append(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                    ).item()
                )
        if all(len(r) < self.window for r in state["readings"].values()):
            return {}
        state["evaluations"] += 1
        for s, r in state["readings"].items():
            if r:
                state["norms"][s].append(sum(r) / len(r))
            state["readings"][s] = []
        return {}

    def _rate(self, state, s: int) -> float | None:
        n = state["norms"][s]
        return abs(n[-1] - n[-2]) / max(n[-2], 1e-12) if len(n) >= 2 else None

    def target(self, state, epoch, epochs, dropped):
        if state["evaluations"] < self.warmup:
            return dropped, {"rule": "warmup"}
        live = [s for s in param_segments(state) if s > dropped and self._rate(state, s) is not None]
        if not live:
            return dropped, {}
        rates = torch.tensor([self._rate(state, s) for s in live])
        threshold = torch.quantile(rates, self.percentile / 100).item()
        limit = drop_limit(state, self.min_trainable)
        best = dropped
        for s in live:
            if s > limit or self._rate(state, s) >= threshold:
                break
            best = s
        return best, {
            "threshold": round(threshold, 5),
            "rates": {str(s): round(self._rate(state, s), 5) for s in live},
        }
