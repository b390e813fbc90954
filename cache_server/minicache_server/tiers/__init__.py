"""Storage tiers of the cache server.

- `DeviceTier` (device_tier.py): live `LayerGroupEntry` objects in GPU memory (CuPy)
  or host memory (NumPy) under a byte budget, least recently used first out.
- `RedisTier` (redis_tier.py): overflow; checksummed entry encodings in Redis.

`SequenceStore` (../sequence_store.py) moves entries between them: it writes an entry
to Redis and frees it from the device tier only after Redis acknowledged, and promotes
an overflowed entry back on prefetch.
"""
