"""Token retention for merged pairs: which (head, token) units stay unmerged.

Distances are angular, d = Ω/π in [0, 1], shape `[kv_heads, tokens]`. The first put of
a pair fixes a threshold on d (`distance_threshold`); every later token is tested
against that same threshold (`retained_mask`), so history is never re-decided.
"""

from __future__ import annotations

import math
from typing import Any

from minicache_client.array_namespace import array_namespace
from minicache_client.policy import Retention

# Distances spread narrower than this carry no "distinct" tokens to retain.
DEGENERATE_SPREAD = 1e-7


def distance_threshold(distances: Any, retention: Retention) -> float:
    """Threshold on d from the first put; ±inf means "retain none"."""
    xp = array_namespace(distances)
    most = retention.side == "most_distinct"
    nothing = math.inf if most else -math.inf
    if distances.size == 0:
        return nothing
    if retention.fraction is not None:
        if retention.fraction == 0:
            return nothing
        if retention.fraction == 1:
            return -math.inf if most else math.inf
        quantile = 1 - retention.fraction if most else retention.fraction
        return float(xp.quantile(distances, quantile))
    low, high = float(distances.min()), float(distances.max())
    if high - low < DEGENERATE_SPREAD:
        return nothing
    if most:
        return low + (1 - retention.gamma) * (high - low)
    return low + retention.gamma * (high - low)


def retained_mask(distances: Any, threshold: float, retention: Retention, first_token: int) -> Any:
    """bool `[kv_heads, tokens]`: units to retain. `first_token` is the absolute index
    of column 0, for the always-retained leading sink tokens."""
    xp = array_namespace(distances)
    if retention.side == "most_distinct":
        mask = distances >= threshold
    else:
        mask = distances <= threshold
    sink_columns = max(0, min(retention.sink_tokens - first_token, distances.shape[1]))
    if sink_columns:
        mask[:, :sink_columns] = True
    return mask if mask.dtype == xp.bool_ else mask.astype(xp.bool_)
