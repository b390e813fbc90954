"""Merging two adjacent layers' KV vectors (MiniCache, design.md section 3)."""

from __future__ import annotations

from typing import Any

from minicache_client.array_namespace import array_namespace

# Below this sin(Ω) the SLERP weights lose precision: fall back to normalised lerp.
NEAR_PARALLEL_SIN = 1e-4


def slerp_merge(x: Any, y: Any, t: float) -> tuple[Any, Any, Any]:
    """Merge layer l-1 (`x`) and layer l (`y`) per head and token.

    Args:
        x, y: float32 `[kv_heads, tokens, head_dim]`.
        t: interpolation towards `y` (paper default 0.6).
    Returns:
        direction: float32 `[kv_heads, tokens, head_dim]`, unit norm (zero where
            both inputs are zero or exactly opposite with t = 0.5).
        magnitudes: float32 `[2, kv_heads, tokens]`, |x| and |y|.
        omega: float32 `[kv_heads, tokens]`, the angle between x and y in [0, π].
    """
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


def average_merge(x: Any, y: Any) -> Any:
    """The paper's baseline: both layers replaced by their mean, float32 `[H, T, D]`."""
    return (x + y) * 0.5
