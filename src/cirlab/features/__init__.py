"""Content-hashed image feature store shared by methods, evaluator and index (STYLE.md rule 10)."""

from cirlab.features.cache import CachedFeatures, FeatureCache, default_cache_dir, encoder_key
from cirlab.features.hashing import StatMemo, hash_array, hash_bytes, hash_file, hash_files

__all__ = [
    "CachedFeatures",
    "FeatureCache",
    "StatMemo",
    "default_cache_dir",
    "encoder_key",
    "hash_array",
    "hash_bytes",
    "hash_file",
    "hash_files",
]
