"""The activation cache: on-disk format, tiers, and the store that owns its folders."""

from .format import CACHE_FORMAT, CACHE_VERSION, DTYPES, ActivationCache, Arrays, fingerprint_of, tensors_hash
from .store import CacheStore, Reuse, data_fingerprint, keyed, sample_keys
from .tiers import DiskTier, MemoryTier, Tier, choose_tier, host_available_bytes, place

__all__ = [
    "CACHE_FORMAT", "CACHE_VERSION", "DTYPES", "ActivationCache", "Arrays", "fingerprint_of", "tensors_hash",
    "CacheStore", "Reuse", "data_fingerprint", "keyed", "sample_keys", "Tier", "MemoryTier", "DiskTier", "choose_tier", "host_available_bytes", "place",
]
