"""Drop policies: they decide how far the cut may advance. One engine runs them all."""

from dataclasses import fields

from ..errors import FxdropError
from .autofreeze import AutoFreeze
from .base import Policy
from .learndrop import LearnDrop
from .schedules import Fixed, FreezeOut, NoDrop, Schedule

__all__ = [
    "Policy",
    "LearnDrop",
    "AutoFreeze",
    "FreezeOut",
    "Fixed",
    "Schedule",
    "NoDrop",
    "parse_policy",
    "policy_from_description",
]


def _value(text: str) -> bool | int | float:
    """A LearnDrop field's value as written: true/false, an integer or a number."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return float(text) if "." in text or "e" in text else int(text)


def parse_policy(text: str) -> Policy:
    """Parse a policy name: learn-drop[:FIELD=VALUE,...] | autofreeze | freezeout[:T0] |
    freezeout-schedule[:T0] (FreezeOut's schedule without its annealing) | none | fixed:CUT@EPOCH."""
    names = {
        "learn-drop": LearnDrop,
        "learndrop": LearnDrop,
        "autofreeze": AutoFreeze,
        "freezeout": FreezeOut,
        "none": NoDrop,
        "nodrop": NoDrop,
    }
    if text in names:
        return names[text]()
    if text.startswith(("learn-drop:", "learndrop:")):
        try:
            pairs = [kv.split("=", 1) for kv in text.split(":", 1)[1].split(",")]
            return LearnDrop(**{k: _value(v) for k, v in pairs})
        except (ValueError, TypeError):
            pass
    if text == "freezeout-schedule":
        return FreezeOut(land=False)
    for prefix, land in (("freezeout:", True), ("freezeout-schedule:", False)):
        if text.startswith(prefix):
            try:
                return FreezeOut(t0=float(text[len(prefix) :]), land=land)
            except ValueError:
                pass
    if text.startswith("fixed:"):
        cut, _, epoch = text[len("fixed:") :].partition("@")
        try:
            return Fixed(int(cut) if cut.lstrip("-").isdigit() else cut, int(epoch or 0))
        except ValueError:
            pass
    raise FxdropError(
        f"unknown policy '{text}'; use learn-drop[:FIELD=VALUE,...], autofreeze, freezeout[:T0], "
        "freezeout-schedule[:T0], none or fixed:CUT@EPOCH (e.g. fixed:layer2@1)"
    )


def policy_from_description(described: dict) -> Policy:
    """The policy a run's `config.json` describes (`Policy.describe()`), to continue the run."""
    kinds = {cls.__name__: cls for cls in (LearnDrop, AutoFreeze, FreezeOut, Fixed, Schedule, NoDrop)}
    values = dict(described)
    kind = kinds.get(values.pop("name", None))
    try:
        defaults = {f.name: f.default for f in fields(kind)}
        # strict JSON writes a non-finite default (LearnDrop.tau = inf) as null
        values = {
            k: defaults[k] if v is None and isinstance(defaults.get(k), float) else v
            for k, v in values.items()
        }
        return kind(**values)
    except TypeError as exc:  # no such policy (None) or fields it does not take
        raise FxdropError(
            f"cannot rebuild the policy {described!r} of this run ({exc}); was it made by another "
            "fxdrop version?"
        ) from exc
