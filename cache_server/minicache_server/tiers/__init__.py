"""Storage tiers of the cache server, behind one interface (`base.py`, `StorageTier`).

| module | what it holds |
|---|---|
| `base.py` | the interface: every primitive and who calls it; `EntryKey` |
| `device_tier.py` | `DeviceTier`: live entries in GPU memory (CuPy) or host memory (NumPy) under a byte budget |
| `encoded_tier.py` | what the persistent tiers share: checksummed encodings bound to their key |
| `disk_tier.py` | `DiskTier`: a file per entry under a directory within a byte budget, written atomically |
| `redis_tier.py` | `RedisTier`: entries in Redis, unbounded here (Redis's own memory policy applies) |
| `chain.py` | `TierChain`: the configured order (device -> disk -> Redis or a prefix), placement, demotion, promotion |
"""
