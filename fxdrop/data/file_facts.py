"""What fxdrop has learnt about an image folder's files, remembered between runs: each file's
content hash (what the cache keys samples by) and whether it decodes.

A fact is kept under the file's path relative to the folder, with its size and modification time
(ns): a file whose size or mtime changed is read again, one that did not is not. So an update of a
folder of 10,000 images with 100 new ones reads the 100.

    $XDG_CACHE_HOME/fxdrop/file-facts/<sha256 of the folder's path>.json   (~/.cache without it)

The file is only a memo: a missing, damaged or unwritable one means the files are read again, never
an error. The memos together are kept under `MAX_BYTES`: after a memo is written, the least recently
used ones (a memo read is touched) are deleted until the rest fit. `clear_file_facts()` (`fxdrop
clean-cache`) deletes them all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .._io import cache_home, sha256_file, write_json

__all__ = ["FileFacts", "Cleared", "clear_file_facts", "facts_dir", "MAX_BYTES"]

# all memos together; one is about 340 KB for 10,000 images, so this keeps about 190 folders'
MAX_BYTES = 64 * 2**20


def facts_dir() -> Path:
    """Where the memos are: `$XDG_CACHE_HOME/fxdrop/file-facts` (`~/.cache` without it)."""
    return cache_home() / "file-facts"


class FileFacts:
    """Content hashes and readability of the files under `root`, remembered in the memo file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = facts_dir() / f"{hashlib.sha256(str(self.root).encode()).hexdigest()[:32]}.json"
        self.facts: dict[str, dict] = {}
        self.changed = False
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict) and loaded.get("root") == str(self.root):
                self.facts = loaded.get("files", {})
                os.utime(self.path)  # used: the last memo to go when the memos outgrow MAX_BYTES
        except (OSError, ValueError):  # no memo yet, or a damaged one: the files are read again
            pass

    def _entry(self, path: str) -> tuple[str, dict]:
        """The fact record of `path`, emptied when the file's size or mtime changed."""
        st = os.stat(path)
        rel = os.path.relpath(path, self.root)
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self.facts.get(rel)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry = {"stamp": stamp}
            self.facts[rel] = entry
            self.changed = True
        return rel, entry

    def sha256(self, path: str) -> str:
        """The file's content hash (read only when the file is new or changed)."""
        _, entry = self._entry(path)
        if "sha256" not in entry:
            entry["sha256"] = sha256_file(Path(path))
            self.changed = True
        return entry["sha256"]

    def readable(self, path: str, check) -> bool:
        """Whether the file decodes, by `check(path)` when the file is new or changed."""
        try:
            _, entry = self._entry(path)
        except OSError:
            return False
        if "readable" not in entry:
            entry["readable"] = bool(check(path))
            self.changed = True
        return entry["readable"]

    def save(self) -> None:
        """Write the memo if anything was learnt (a failure to write it is not an error)."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"root": str(self.root), "files": self.facts})
            self.changed = False
            _bound(self.path.parent, MAX_BYTES, keep=self.path)
        except Exception:  # only a memo; without it the files are read again next time
            pass


def _memos(folder: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every memo in `folder`, least recently used first."""
    found = []
    for p in folder.glob("*.json"):
        try:
            st = p.stat()
        except OSError:  # deleted meanwhile by another process
            continue
        found.append((st.st_mtime, st.st_size, p))
    return sorted(found, key=lambda m: m[:2])


def _bound(folder: Path, max_bytes: int, keep: Path) -> None:
    """Delete the least recently used memos until the rest take at most `max_bytes` (`keep`,
    the memo just written, stays)."""
    memos = _memos(folder)
    total = sum(size for _, size, _ in memos)
    for _, size, p in memos:
        if total <= max_bytes:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size


@dataclass(frozen=True)
class Cleared:
    """What `clear_file_facts` deleted."""

    folder: Path
    files: int
    bytes: int


def clear_file_facts() -> Cleared:
    """Delete every remembered file fact (the next run reads its image files again).

    Returns:
        The folder, and how many memo files and bytes were deleted.

    Example:
        >>> clear_file_facts().bytes
    """
    folder = facts_dir()
    memos = _memos(folder) if folder.is_dir() else []
    for _, _, p in memos:
        p.unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:  # interrupted writes
        tmp.unlink(missing_ok=True)
    return Cleared(folder, len(memos), sum(size for _, size, _ in memos))
