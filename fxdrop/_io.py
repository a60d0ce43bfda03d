"""Files: atomic writes (a temporary name in the same folder, then a rename), strict JSON, hashes,
and advisory folder locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import FxdropError

_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = [
    "atomic_path",
    "as_json",
    "write_json",
    "save_torch",
    "save_safetensors",
    "sha256_file",
    "cache_home",
    "FolderLock",
    "os_error",
]


def os_error(exc: OSError, path: Path | str, what: str) -> FxdropError:
    """An OSError a user can fix (no space, no permission, read-only) as one line naming `path`."""
    hint = {
        errno.ENOSPC: "the disk is full; free space or choose another folder",
        errno.EDQUOT: "the disk quota is exhausted; free space or choose another folder",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "permission denied; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose another folder",
    }.get(exc.errno)
    return FxdropError(f"cannot write {what} '{path}': {hint or exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed to `path`,
    on failure (a full disk, Ctrl-C) it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and safetensors) make 0600; outputs get ordinary permissions
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON parsers refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False)


def as_json(obj: Any) -> Any:
    """`obj` as it reads back from a JSON file fxdrop wrote (infinities null, tuples lists), so a
    value compares equal to its stored copy."""
    return json.loads(_dumps(obj))


def write_json(path: str | Path, obj: Any) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(_dumps(obj, indent=1) + "\n")
    except OSError as exc:
        raise os_error(exc, path, "file") from exc


def save_torch(obj: Any, path: str | Path) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        raise _write_error(exc, path) from exc


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    try:
        with atomic_path(path) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
            )
    except (OSError, RuntimeError) as exc:  # safetensors reports I/O errors as its own types
        raise _write_error(exc, path) from exc


def _write_error(exc: BaseException, path: str | Path) -> FxdropError:
    if isinstance(exc, OSError):
        return os_error(exc, path, "file")
    # torch and safetensors wrap the OSError; ask the file system what went wrong
    st = os.statvfs(Path(path).parent)
    if st.f_bavail * st.f_frsize < 64 * 2**20:
        return FxdropError(
            f"cannot write file '{path}': the disk is full; free space or choose another folder"
        )
    return FxdropError(f"cannot write file '{path}' ({type(exc).__name__}: {exc})")


def cache_home() -> Path:
    """fxdrop's folder among the user's caches: `$XDG_CACHE_HOME/fxdrop` (`~/.cache` without it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxdrop"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FolderLock:
    """An advisory lock on a folder (`<folder>/.fxdrop.lock`, flock), held until `release()` or
    the process ends; a second process gets one line naming the process that holds it.

    `release()` deletes the lock file while still holding the lock, then lets go. A process that
    opened the file before it was deleted may then lock the deleted file: so after locking, the
    holder checks that the path still names the file it locked, and otherwise tries again on the
    new one. Only the holder of the lock on the file at the path holds the folder."""

    NAME = ".fxdrop.lock"

    def __init__(self, folder: Path, what: str) -> None:
        self.path = folder / self.NAME
        self._fd: int | None = None
        while self._fd is None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            except OSError as exc:
                raise os_error(exc, folder, what) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FxdropError(
                    f"{what} '{folder}' is in use by process {holder}; wait for it to finish or "
                    "choose another folder"
                ) from None
            if self._names(fd):
                self._fd = fd
            else:  # the file was deleted by the holder that released it: lock the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def _names(self, fd: int) -> bool:
        """Whether the lock path is the file open as `fd`."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def release(self) -> None:
        """Delete the lock file (if it is still this lock's) and let go of the lock."""
        if self._fd is None:
            return
        try:
            if self._names(self._fd):
                self.path.unlink()
        except OSError:  # a read-only or vanished folder: the lock still goes with the descriptor
            pass
        finally:
            os.close(self._fd)
            self._fd = None
