"""Drop policies: they decide how far the cut may advance. One engine runs them all."""

from ..errors import FxdropError
from .autofreeze import AutoFreeze
from .base import Policy
from .learndrop import LearnDrop
from .schedules import Fixed, FreezeOut, NoDrop, Schedule

__all__ = ["Policy", "LearnDrop", "AutoFreeze", "FreezeOut", "Fixed", "Schedule", "NoDrop", "parse_policy"]


def parse_policy(text: str) -> Policy:
    """Parse a policy name: learn-drop | autofreeze | freezeout | none | fixed:CUT@EPOCH."""
    names = {"learn-drop": LearnDrop, "learndrop": LearnDrop, "autofreeze": AutoFreeze, "freezeout": FreezeOut,
             "none": NoDrop, "nodrop": NoDrop}
    if text in names:
        return names[text]()
    if text.startswith("fixed:"):
        cut, _, epoch = text[len("fixed:") :].partition("@")
        try:
            return Fixed(int(cut) if cut.lstrip("-").isdigit() else cut, int(epoch or 0))
        except ValueError:
            pass
    raise FxdropError(f"unknown policy '{text}'; use learn-drop, autofreeze, freezeout, none or fixed:CUT@EPOCH "
                      "(e.g. fixed:layer2@1)")
