"""How cached activations are stored: a cast (fp32, bf16, fp16) or a quantization (int8, fp8).

    fp32  exact
    bf16  |error| <= |x| * 2^-8                    (8 significant bits)
    fp16  |error| <= |x| * 2^-11 + 2^-25           (11 significant bits; overflows above 65504)
    int8  affine per group: x ~ q * scale + shift, q in [-127, 127]
          |error| <= scale / 2 = (max - min) / 508 of the group
    fp8   e4m3 per group: x ~ q * scale, scale = absmax / 448
          |error| <= |x| * 2^-4 + scale * 2^-10    (4 significant bits; subnormals below 2^-6)

A quantization group is a run of whole channels of one sample holding at least `GROUP` values (a
channel of a 56x56 map; eight channels of an 8x8 one; the whole sample when it is smaller), so
its two fp32 parameters cost at most 8 / GROUP of the int8 bytes (3%). A group has its own range,
so a channel of large activations does not coarsen the others.

A codec turns a float block `(n, *shape)` into named tensors (`x`, and `scale`/`shift` of shape
`(n, groups)`) and back; the parts are stored, gathered and moved as they are, and decoded on
the device, after the copy (a quarter of fp32's bytes for int8): a conversion, a multiply, an add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Codec", "CODECS", "codec", "AUTO_ORDER", "GROUP"]

GROUP = 256  # fewest values in a quantization group
_EPS = 4 * torch.finfo(torch.float32).eps  # rounding of the fp32 arithmetic around a quantization


@dataclass(frozen=True)
class Codec:
    """One storage format of cached activations."""

    name: str  # fp32 | bf16 | fp16 | int8 | fp8
    stored: torch.dtype  # dtype of the stored `x` (fp8: its bytes, uint8)
    params: tuple[str, ...] = ()  # per-group parameters stored beside `x` (fp32)

    @property
    def quantized(self) -> bool:
        return bool(self.params)

    def tag(self) -> str:
        """What the stored bytes mean: recorded in the manifest and in the fingerprint."""
        scheme = {"int8": f"/affine-g{GROUP}", "fp8": f"/e4m3-g{GROUP}"}
        return self.name + scheme.get(self.name, "")

    def group_size(self, shape: tuple[int, ...] | list[int]) -> int:
        """Values per quantization group of a sample of `shape` (C, *spatial): the fewest whole
        channels, dividing C, that hold at least GROUP values (the whole sample if none do)."""
        shape = tuple(shape)
        per_channel = math.prod(shape[1:]) if len(shape) > 1 else 1
        channels = shape[0] if shape else 1
        for k in range(1, channels + 1):
            if channels % k == 0 and k * per_channel >= GROUP:
                return k * per_channel
        return channels * per_channel

    def sample_bytes(self, shape: tuple[int, ...] | list[int]) -> int:
        """Stored bytes of one sample of `shape` (parameters included)."""
        n = math.prod(shape)
        groups = n // self.group_size(shape) if self.quantized else 0
        return n * self.stored.itemsize + 4 * len(self.params) * groups

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts stored for a block `x` (n, *shape) of float activations."""
        if not self.quantized:
            return {"x": x.detach().to(self.stored).contiguous()}
        n, shape = len(x), tuple(x.shape[1:])
        g = x.detach().float().contiguous().reshape(n, -1, self.group_size(shape))  # (n, G, L)
        if self.name == "int8":
            lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
            shift = (hi + lo) / 2
            scale = ((hi - lo) / 254).clamp_min(torch.finfo(torch.float32).tiny)
            q = ((g - shift) / scale).round_().clamp_(-127, 127).to(torch.int8)
        else:
            shift = None
            scale = (g.abs().amax(dim=2, keepdim=True) / 448).clamp_min(torch.finfo(torch.float32).tiny)
            # kept as its bytes (uint8): indexing and copying fp8 tensors is not implemented everywhere
            q = (g / scale).clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        parts = {"x": q.reshape(n, *shape), "scale": scale.reshape(n, -1)}
        if shift is not None:
            parts["shift"] = shift.reshape(n, -1)
        return parts

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float activations `(n, *shape)` of stored parts (on whatever device they are on)."""
        x = parts["x"]
        if not self.quantized:
            return x.to(dtype)
        n, shape = len(x), tuple(x.shape[1:])
        if self.name == "fp8":
            x = x.view(torch.float8_e4m3fn)
        q = x.reshape(n, parts["scale"].shape[1], -1).to(torch.float32)  # (n, G, L)
        scale = parts["scale"].unsqueeze(2)
        out = q.mul_(scale).add_(parts["shift"].unsqueeze(2)) if "shift" in parts else q.mul_(scale)
        return out.reshape(n, *shape).to(dtype)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """The largest |decode(encode(x)) - x| the scheme allows, per element of `x` (n, *shape)."""
        x = x.detach().float()
        if self.name == "fp32":
            return torch.zeros_like(x)
        if self.name == "bf16":
            return x.abs() * 2**-8
        if self.name == "fp16":
            return x.abs() * 2**-11 + 2**-25
        n, shape = len(x), tuple(x.shape[1:])
        g = x.contiguous().reshape(n, -1, self.group_size(shape))
        if self.name == "int8":
            lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
            bound = (hi - lo) / 508 + _EPS * torch.maximum(lo.abs(), hi.abs())
            return bound.expand_as(g).reshape(n, *shape)
        scale = g.abs().amax(dim=2, keepdim=True) / 448
        return (g.abs() * (2**-4 + _EPS) + scale * 2**-10).reshape(n, *shape)


CODECS = {
    "fp32": Codec("fp32", torch.float32),
    "bf16": Codec("bf16", torch.bfloat16),
    "fp16": Codec("fp16", torch.float16),
    "int8": Codec("int8", torch.int8, ("scale", "shift")),
    "fp8": Codec("fp8", torch.uint8, ("scale",)),  # the bytes of float8_e4m3fn values
}
# `cache_dtype="auto"` takes the first of these whose cache fits (most exact first): fp16 is left
# out for its range (it overflows above 65504), fp8 because int8 is as small and, for activations,
# more exact (docs/benchmarks.md, "Cache formats")
AUTO_ORDER = ("fp32", "bf16", "int8")
_BY_DTYPE = {c.stored: c for c in CODECS.values() if not c.quantized}


def codec(fmt: str | torch.dtype) -> Codec:
    """The codec of a format name (fp32, bf16, fp16, int8, fp8) or a float dtype."""
    if isinstance(fmt, torch.dtype):
        return _BY_DTYPE[fmt]
    return CODECS[fmt]
