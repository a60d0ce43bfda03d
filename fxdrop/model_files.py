"""Model files this user ran: the Python files `fxdrop update` may import again.

A run made from `path.py:FACTORY` names that file in its `config.json`. A run folder is input
from outside (a colleague's, a shared disk's), so an update does not import a file because the
folder names it: only a file this user named themselves in a `finetune` on this machine, with the
same content (sha256), or one named again by the caller. The list lives in
`$XDG_CACHE_HOME/fxdrop/model-files.json` (`~/.cache` without it).
"""

from __future__ import annotations

import json
from pathlib import Path

from ._io import cache_home, sha256_file, write_json

__all__ = ["is_file_spec", "remember", "trusted"]


def is_file_spec(spec: str) -> bool:
    """Whether a model spec names a Python file (`path.py:FACTORY`)."""
    return spec.rpartition(":")[0].endswith(".py")


def _registry() -> Path:
    return cache_home() / "model-files.json"


def _digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _read() -> dict[str, str]:
    try:
        known = json.loads(_registry().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def remember(spec: str) -> None:
    """The user named the file of `spec` to build a model: remember its path and content."""
    path = Path(spec.rpartition(":")[0]).resolve()
    digest = _digest(path)
    if digest is None:
        return
    known = _read()
    if known.get(str(path)) != digest:
        try:
            write_json(_registry(), known | {str(path): digest})
        except OSError:
            pass  # reason: not remembering only means an update asks for the file again


def trusted(spec: str) -> bool:
    """Whether this user ran the file of `spec`, with this content, in a `finetune` here."""
    path = Path(spec.rpartition(":")[0]).resolve()
    digest = _digest(path)
    return digest is not None and _read().get(str(path)) == digest
