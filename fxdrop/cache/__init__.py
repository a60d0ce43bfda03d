"""The activation cache: storage formats, on-disk format (manifest, shards), tiers, and the store that
owns its folders."""

from .arrays import Arrays
from .codecs import AUTO_ORDER, CODECS, Codec, codec
from .format import DTYPES, ActivationCache, shard_bytes_for
from .manifest import CACHE_FORMAT, CACHE_VERSION, Invalid
from .store import CacheStore, Reuse, data_fingerprint, fingerprint_of, keyed, sample_keys, tensors_hash
from .tiers import (
    DiskTier,
    MemoryTier,
    Placement,
    Tier,
    budgets,
    choose_placement,
    choose_tier,
    host_available_bytes,
    place,
)

__all__ = [
    "AUTO_ORDER",
    "CODECS",
    "Codec",
    "codec",
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DTYPES",
    "ActivationCache",
    "Arrays",
    "Invalid",
    "fingerprint_of",
    "shard_bytes_for",
    "tensors_hash",
    "CacheStore",
    "Reuse",
    "data_fingerprint",
    "keyed",
    "sample_keys",
    "Tier",
    "MemoryTier",
    "DiskTier",
    "Placement",
    "budgets",
    "choose_placement",
    "choose_tier",
    "host_available_bytes",
    "place",
]
