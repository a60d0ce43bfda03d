"""One shard file: a safetensors file holding a run of rows of one view, `x` (n, *shape) as stored,
the codec's parameters (n, groups) when quantized, and `y`, `key`, `view` (n,) int64.

Shards are read with safetensors' own `safe_open` and written by the streaming writer below (its
reason is on it). The bytes are plain safetensors either way: safetensors' `load_file` reads what
`write_shard` writes, and `read_tensors` reads what safetensors' `save_file` writes
(tests/test_cache_formats.py checks both, and a shard of the writer before this one, byte for byte).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["read_tensors", "write_shard"]

# safetensors' names of the dtypes a shard holds (fp8 is stored as its bytes, U8: codecs.py)
_ST_NAMES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int64: "I64",
}


def read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors `names` (default: all, in file order) of a shard, each read with one `pread` of just
    its bytes into memory of its own.

    reason for backend="pread": the default backend maps the file and hands out views of the
    mapping, which keep the file mapped (its touched pages resident) while they live, and which are
    misaligned where an int8 `x` whose length is not a multiple of 4 comes before the fp32
    parameters (the writer does not pad between tensors). A pread buffer is the tensor's own and
    aligned, as the reader before this one made it (a `readinto` per tensor): no copy is added.
    Unlike `readinto`, safetensors 0.8 keeps the GIL during the read (the disk tier reads on a
    thread while training runs).
    """
    with safe_open(path, framework="pt", backend="pread") as f:
        return {name: f.get_tensor(name) for name in (f.offset_keys() if names is None else names)}


def write_shard(path: Path, tensors: dict[str, list[torch.Tensor]]) -> str:
    """Write a safetensors file whose tensor `name` is the rows of `tensors[name]` joined, streaming
    each part's bytes, and return the file's sha256.

    reason for not using safetensors' `save_file`: it takes one tensor per name, so the blocks of a
    shard (up to `_SHARD_BYTES`) would be joined into a copy first and the build would hold each
    shard twice; and it returns no hash, so the file would be read back to hash it. Streamed
    here, each block is written and hashed from where it already is. The header is safetensors'
    (8-byte length, JSON, padded with spaces to 8 bytes), tensors in the given order.
    """
    header, offset = {}, 0
    for name, parts in tensors.items():
        nbytes = sum(t.numel() * t.element_size() for t in parts)
        header[name] = {
            "dtype": _ST_NAMES[parts[0].dtype],
            "shape": [sum(len(t) for t in parts), *parts[0].shape[1:]],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for parts in tensors.values():
            for t in parts:
                if t.numel():
                    raw = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                    f.write(raw)
                    digest.update(raw)
    return digest.hexdigest()
