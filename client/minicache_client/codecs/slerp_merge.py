"""`slerp`: MiniCache (Liu et al., 2024), docs/design.md section 3.

Per KV head and token, with x = layer l-1's vector and y = layer l's:
Ω = angle(x, y); the merged direction is the SLERP of the unit vectors,
e = sin((1-t)Ω)/sin(Ω) · x/|x| + sin(tΩ)/sin(Ω) · y/|y| (normalised lerp when sin(Ω)
is tiny), stored once for both layers; |x| and |y| are kept per token (`magnitudes`
`[2, kv_heads, merged]`, float16, float32 where float16 would overflow). Restore:
x̂ = |x|·e/|e|, ŷ = |y|·e/|e|.

Retention: angular distance d = Ω/π per (head, token). The first merged chunk fixes a
threshold on d: with `fraction` unset, the paper's rule (min-max normalise d over that
chunk's tokens and heads, retain d̃ ≥ 1 − γ on side "most_distinct", d̃ ≤ γ on
"least_distinct"); with `fraction` set, that quantile of d. Later tokens are tested
against the same threshold, so history is never re-decided. Retained units keep both
layers' original vectors (`retained` `[2, count, head_dim]`, the entry's dtype) at
(`retained_heads`, `retained_tokens`) and are scattered back on restore. The first
`sink_tokens` tokens are always retained, for every head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from minicache_client.array_namespace import array_namespace, widen_to_float32
from minicache_client.codecs.base import Codec, CorruptEntryError, check_stored, concat_tokens
from minicache_client.codecs.merged_pair import MergedPair
from minicache_client.policy import PairMerge, Retention

# Below this sin(Ω) the SLERP weights lose precision: fall back to normalised lerp.
NEAR_PARALLEL_SIN = 1e-4
# Distances spread narrower than this carry no "distinct" tokens to retain.
DEGENERATE_SPREAD = 1e-7


def slerp_merge(x: Any, y: Any, t: float) -> tuple[Any, Any, Any]:
    """Merge layer l-1 (`x`) and layer l (`y`), float32 `[kv_heads, tokens, head_dim]`.

    Returns the unit direction (zero where both inputs are zero, or exactly opposite
    with t = 0.5), the magnitudes `[2, kv_heads, tokens]` (|x|, |y|) and the angle Ω
    `[kv_heads, tokens]` in [0, π], all float32."""
    xp = array_namespace(x, y)
    norm_x = xp.linalg.norm(x, axis=-1)
    norm_y = xp.linalg.norm(y, axis=-1)
    unit_x = x / xp.where(norm_x > 0, norm_x, 1)[..., None]
    unit_y = y / xp.where(norm_y > 0, norm_y, 1)[..., None]
    # 2·atan2(|x̂−ŷ|, |x̂+ŷ|) equals arccos(<x̂, ŷ>) but stays accurate near 0 and π,
    # where a float32 cosine rounds away the small angles retention relies on.
    omega = 2 * xp.arctan2(
        xp.linalg.norm(unit_x - unit_y, axis=-1), xp.linalg.norm(unit_x + unit_y, axis=-1)
    )
    sin_omega = xp.sin(omega)
    near = sin_omega < NEAR_PARALLEL_SIN
    safe_sin = xp.where(near, 1, sin_omega)
    weight_x = xp.where(near, 1 - t, xp.sin((1 - t) * omega) / safe_sin)
    weight_y = xp.where(near, t, xp.sin(t * omega) / safe_sin)
    direction = weight_x[..., None] * unit_x + weight_y[..., None] * unit_y
    norm_e = xp.linalg.norm(direction, axis=-1, keepdims=True)
    direction = direction / xp.where(norm_e > 0, norm_e, 1)
    magnitudes = xp.stack([norm_x, norm_y]).astype(xp.float32, copy=False)
    return direction.astype(xp.float32, copy=False), magnitudes, omega.astype(xp.float32)


def distance_threshold(distances: Any, retention: Retention) -> float:
    """Threshold on d from the first merged chunk; ±inf means "retain none"."""
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


@dataclass
class SlerpMerge(MergedPair):
    """`retention`: the `Retention` settings as a dict (None: retain nothing)."""

    name: ClassVar[str] = "slerp"

    t: float = 0.6
    retention: dict | None = None
    magnitudes: Any = None
    threshold: float | None = None
    retained_heads: Any = None
    retained_tokens: Any = None
    retained: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        xp = array_namespace(self.recent)
        if self.magnitudes is None:
            self.magnitudes = xp.zeros((2, self.kv_heads, 0), dtype=xp.float16)
            self.retained_heads = xp.zeros(0, dtype=xp.int16)
            self.retained_tokens = xp.zeros(0, dtype=xp.int32)
            self.retained = xp.zeros((2, 0, self.head_dim), dtype=self.recent.dtype)

    @classmethod
    def for_pair(cls, merge: PairMerge, direction: Codec) -> SlerpMerge:
        pair = super().for_pair(merge, direction)
        pair.t = merge.t
        pair.retention = None if merge.retention is None else asdict(merge.retention)
        return pair

    @property
    def retained_count(self) -> int:
        return int(self.retained_tokens.shape[0])

    def merge(self, x: Any, y: Any, originals: Any, first_token: int) -> Any:
        xp = array_namespace(x, y)
        direction, magnitudes, omega = slerp_merge(x, y, self.t)
        stored = magnitudes.astype(xp.float16)
        fits = xp.isfinite(stored)
        if self.magnitudes.dtype == xp.float32 or not bool(fits.all()):
            # float32 where float16 overflows; a magnitude that fits is still rounded to
            # float16, so it does not depend on how tokens were chunked.
            stored = xp.where(fits, stored.astype(xp.float32), magnitudes)
            self.magnitudes = self.magnitudes.astype(xp.float32)
        self.magnitudes = concat_tokens(self.magnitudes, stored, axis=2)
        if self.retention is None:
            return direction
        retention = Retention(**self.retention)
        distances = omega / math.pi
        if self.threshold is None:
            self.threshold = distance_threshold(distances, retention)
        mask = retained_mask(distances, self.threshold, retention, first_token)
        # Token-major order: units stored in the same order however the tokens arrived.
        tokens, heads = xp.nonzero(mask.T)
        if heads.size:
            self.retained_heads = concat_tokens(self.retained_heads, heads.astype(xp.int16), axis=0)
            self.retained_tokens = concat_tokens(
                self.retained_tokens, (tokens + first_token).astype(xp.int32), axis=0
            )
            self.retained = concat_tokens(self.retained, originals[:, heads, tokens], axis=1)
        return direction

    def prepare(self, shared: Any, start: int, end: int) -> Any:
        """1/|e| per (head, token), 0 where the direction is zero."""
        xp = array_namespace(shared)
        norms = xp.sqrt(xp.einsum("htd,htd->ht", shared, shared))
        return xp.where(norms > 0, 1 / xp.where(norms > 0, norms, 1), 0)

    def expand(self, shared: Any, prepared: Any, which: int, start: int, end: int) -> Any:
        xp = array_namespace(shared)
        factor = self.magnitudes[which, :, start:end].astype(xp.float32) * prepared
        restored = shared * factor[..., None]
        if self.retained_count:
            tokens = self.retained_tokens
            inside = (tokens >= start) & (tokens < end)
            if bool(inside.any()):
                originals = widen_to_float32(self.retained[which][inside], self.dtype)
                restored[self.retained_heads[inside], tokens[inside] - start] = originals
        return restored

    def check(self) -> None:
        super().check()
        merged = self.merged_tokens
        check_stored(
            self.magnitudes.shape == (2, self.kv_heads, merged)
            and self.magnitudes.dtype.name in ("float16", "float32"),
            "magnitudes disagree with the merged direction",
        )
        count = self.retained_count
        check_stored(
            self.retained_heads.shape == self.retained_tokens.shape == (count,)
            and self.retained_heads.dtype.kind in "iu"
            and self.retained_tokens.dtype.kind in "iu"
            and self.retained.shape == (2, count, self.head_dim)
            and self.retained.dtype == self.recent.dtype,
            "retained tokens disagree with their positions",
        )
        if count:
            check_stored(
                int(self.retained_tokens.min()) >= 0 and int(self.retained_tokens.max()) < merged,
                "retained token out of range",
            )
            check_stored(
                int(self.retained_heads.min()) >= 0
                and int(self.retained_heads.max()) < self.kv_heads,
                "retained head out of range",
            )
        if self.retention is not None:
            try:
                Retention(**self.retention)
            except (TypeError, ValueError) as exc:
                raise CorruptEntryError(f"retention settings are malformed: {exc}") from None
