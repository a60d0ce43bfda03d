"""A cache folder's manifest and the checks a folder passes before it is reused.

A manifest that cannot be read, is of another format version or storage format, was made for
another fingerprint, or lists a shard that is missing, of another size, or (verified) of another
sha256, makes the folder a rebuild, never trusted: :func:`checked_manifest` says which check failed
on which file (:class:`Invalid`). A folder holding files fxdrop did not write is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .._io import sha256_file
from ..errors import CacheError
from ..messages import Param
from .codecs import CODECS, Codec, codec

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "Invalid",
    "new_manifest",
    "shards_rows",
    "checked_manifest",
    "read_manifest",
    "check_folder",
]

CACHE_FORMAT = "fxdrop-activation-cache"
# 3: formats (int8, fp8 with their parameters); 2: samples under keys; older: rebuilt, never read
CACHE_VERSION = 3


@dataclass(frozen=True)
class Invalid:
    """Why the files in a cache folder were not reused: the check that failed and on which file."""

    check: str  # manifest | version | format | fingerprint | missing | size | sha256
    file: str  # manifest.json or the shard that failed
    detail: str  # what was found, in words

    def describe(self) -> str:
        return f"{self.file} failed its {self.check} check ({self.detail})"


def new_manifest(fingerprint: str, c: Codec, shards: list[dict]) -> dict:
    """The manifest of a cache just written as `shards` (their records, in file order) in format `c`."""
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "dtype": c.name,
        "scheme": c.tag(),
        "shape": list(shards[0]["shape"]),
        "num_samples": shards_rows(shards),
        "views": len({s["view"] for s in shards}),
        "removed": [],
        "shards": shards,
    }


def shards_rows(shards: list[dict]) -> int:
    """Rows per view of a list of shard records."""
    return sum(s["count"] for s in shards if s["view"] == 0)


def is_ours(name: str) -> bool:
    """A file name fxdrop writes in a cache folder (shards, manifest, interrupted temporaries)."""
    return name == "manifest.json" or name.startswith(("shard-", ".shard-", ".manifest.json."))


def foreign_file_error(root: Path, name: str) -> CacheError:
    return CacheError(
        "cache folder '{root}' holds '{name}', which fxdrop did not write; "
        "point {cache_dir} at an empty or fxdrop-made folder",
        root=root,
        name=name,
        cache_dir=Param("cache_dir"),
    )


def check_folder(root: Path) -> None:
    """Refuse a folder with files fxdrop did not write (they would be deleted on rebuild)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise CacheError(
            "cache path '{root}' is a file, not a folder; choose another {cache_dir}",
            root=root,
            cache_dir=Param("cache_dir"),
        )
    for f in root.iterdir():
        if not is_ours(f.name):
            raise foreign_file_error(root, f.name)


def read_manifest(root: Path) -> dict | None:
    """The folder's manifest, or None when it is missing, truncated or not fxdrop's format."""
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):  # missing, unreadable or damaged: an unfinished build
        return None
    return m if isinstance(m, dict) and m.get("format") == CACHE_FORMAT else None


def checked_manifest(root: Path, fingerprint: str, verify: bool) -> tuple[dict | None, Invalid | None]:
    """`(manifest, None)` when the folder holds a cache for `fingerprint` that this version reads,
    with every shard present, of its recorded size and (with `verify`) its recorded sha256;
    `(None, why)` when fxdrop files there fail a check; `(None, None)` when nothing is there."""
    m = read_manifest(root)
    if m is None:
        return None, _manifest_problem(root)
    invalid = _manifest_mismatch(m, fingerprint) or _shards_problem(root, m["shards"], verify)
    return (None, invalid) if invalid is not None else (m, None)


def _manifest_problem(root: Path) -> Invalid | None:
    """Why a folder without a readable manifest is rebuilt; None when it holds nothing of a cache."""
    path = root / "manifest.json"
    if path.exists():
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return Invalid("manifest", path.name, f"unreadable: {type(exc).__name__}")
        return Invalid("manifest", path.name, "not an fxdrop activation cache manifest")
    if root.is_dir() and any(f.name.startswith("shard-") for f in root.iterdir()):
        return Invalid("manifest", path.name, "missing: a build that did not finish")
    return None


def _manifest_mismatch(m: dict, fingerprint: str) -> Invalid | None:
    """Why a readable manifest does not describe the cache asked for."""
    if m.get("version") != CACHE_VERSION:
        return Invalid(
            "version",
            "manifest.json",
            f"format version {m.get('version')}, this fxdrop reads {CACHE_VERSION}",
        )
    if m.get("dtype") not in CODECS or m.get("scheme") != codec(m["dtype"]).tag():
        # stored bytes whose meaning this version does not know are never decoded
        return Invalid(
            "format",
            "manifest.json",
            f"storage format {m.get('dtype')!r} / {m.get('scheme')!r} is unknown here",
        )
    if m.get("fingerprint") != fingerprint:
        return Invalid(
            "fingerprint", "manifest.json", "made for another prefix, weights, cut, format or data"
        )
    return None


def _shards_problem(root: Path, shards: list[dict], verify: bool) -> Invalid | None:
    """The first shard that is missing, of another size than recorded, or (with `verify`) whose
    bytes do not hash to the recorded sha256."""
    for shard in shards:
        path = root / shard["file"]
        if not path.is_file():
            return Invalid("missing", shard["file"], "listed in the manifest, not on disk")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:  # caches before the size was recorded: sha256 only
            return Invalid("size", shard["file"], f"{size} bytes, the manifest says {shard['bytes']}")
        if verify and sha256_file(path) != shard["sha256"]:
            return Invalid("sha256", shard["file"], "its bytes changed: sha256 mismatch")
    return None
