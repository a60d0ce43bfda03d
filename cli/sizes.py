"""Sizes as text: a size a user types (2GiB, 500MB) in bytes, and bytes as MiB or KiB."""

from __future__ import annotations

import re

from fxdrop.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def size_in_bytes(text: str, field: str) -> int:
    """A size such as 2GiB, 500MB or 1e9 in bytes; anything else is one ConfigError on `field`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).lower()] < 1:
        raise ConfigError(field, f"must be a size such as 2GiB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 or not nbytes else f"{nbytes / 2**10:.1f} KiB"
