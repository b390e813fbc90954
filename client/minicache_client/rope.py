"""Rotary position embedding (RoPE), undone and redone on stored keys.

The keys a model caches carry RoPE: each pair of channels (i, i + rotary_dim / 2) is
rotated by the angle `position * inv_freq[i]`, and the result is scaled by
`attention_scaling` (1 except for YaRN-style scaling). Undoing it gives keys whose
statistics do not turn with position, which a calibrated transform can compress
(docs/design.md "Transform coding"). Positions are token indices.

Every rope type transformers implements (default, linear, dynamic at a fixed length,
llama3, YaRN, longrope) reduces to one `inv_freq` vector and one scale per layer kind,
so a `RopeTable` holds exactly those, read from the model at calibration time, and
works for any of them. Channels beyond `rotary_dim` (partial rotary) are left as they
are. The convention is the "rotate half" one of Llama-family models in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minicache_client.array_namespace import array_namespace


@dataclass(frozen=True)
class RopeTable:
    """`inv_freq`: float32 `[rotary_dim / 2]`; `attention_scaling`: multiplies cos and sin."""

    inv_freq: Any
    attention_scaling: float = 1.0

    def __post_init__(self) -> None:
        inv_freq = np.asarray(self.inv_freq, dtype=np.float32)
        if inv_freq.ndim != 1 or inv_freq.size == 0 or not np.isfinite(inv_freq).all():
            raise ValueError("inv_freq must be a non-empty 1-D vector of finite values")
        if not (np.isfinite(self.attention_scaling) and self.attention_scaling > 0):
            raise ValueError(f"attention_scaling must be > 0, got {self.attention_scaling}")
        object.__setattr__(self, "inv_freq", inv_freq)

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.size)

    def _cos_sin(self, xp: Any, first: int, count: int) -> tuple[Any, Any]:
        positions = xp.arange(first, first + count, dtype=xp.float64)
        angles = positions[:, None] * xp.asarray(self.inv_freq, dtype=xp.float64)[None, :]
        scale = self.attention_scaling
        return (
            (xp.cos(angles) * scale).astype(xp.float32),
            (xp.sin(angles) * scale).astype(xp.float32),
        )

    def rotate(self, keys: Any, first_position: int, inverse: bool = False) -> Any:
        """float32 `keys [..., tokens, head_dim]` at positions `first_position`,
        `first_position + 1`, ...: RoPE applied (or undone, `inverse`), as a new array."""
        xp = array_namespace(keys)
        half = self.rotary_dim // 2
        if keys.shape[-1] < self.rotary_dim:
            raise ValueError(
                f"keys have {keys.shape[-1]} channels, fewer than rotary_dim {self.rotary_dim}"
            )
        cos, sin = self._cos_sin(xp, first_position, keys.shape[-2])
        if inverse:
            # The rotation's inverse, and the scale's: R(-angle) / scale.
            scale2 = np.float32(self.attention_scaling**2)
            cos, sin = cos / scale2, -sin / scale2
        low = keys[..., :half]
        high = keys[..., half : self.rotary_dim]
        out = keys.astype(xp.float32, copy=True)
        out[..., :half] = low * cos - high * sin
        out[..., half : self.rotary_dim] = high * cos + low * sin
        return out
