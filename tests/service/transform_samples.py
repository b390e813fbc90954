"""Small calibration artifacts for tests: random orthonormal bases over tiny shapes,
registered in the process's artifact registry (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from minicache_client.policy import CompressionPolicy, ModelShape, TransformPlan
from minicache_client.rope import RopeTable
from minicache_client.transform_artifact import (
    ARTIFACTS,
    GroupTransform,
    SideTransform,
    TransformArtifact,
    encode_artifact,
)


def _rotation(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((size, size)))[0]


def _orthonormal(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    """float64 `[dim, rank]`, orthonormal columns mixing every coordinate: `rank`
    columns of the Kronecker product of two random rotations of about sqrt(dim) each
    (a QR of the whole `dim x dim` takes seconds for the larger test shapes)."""
    outer = max(f for f in range(1, int(np.sqrt(dim)) + 1) if dim % f == 0)
    rotation = np.kron(_rotation(rng, outer), _rotation(rng, dim // outer))
    return rotation[:, rng.permutation(dim)[:rank]]


def _side(rng: np.random.Generator, dim: int, rank: int, step: float) -> SideTransform:
    # Stored in float16, as calibration stores it.
    basis = _orthonormal(rng, dim, rank).astype(np.float16).astype(np.float32)
    mean = (0.1 * rng.standard_normal(dim)).astype(np.float32)
    scales = np.geomspace(8.0, 0.1, rank).astype(np.float32)
    return SideTransform(mean, basis, step, scales)


def sample_artifact(
    num_layers: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    groups: Sequence[Sequence[int]] = ((0, 1), (2, 3)),
    coder: str = "rans",
    rank_fraction: float = 1.0,
    step: float = 0.05,
    seed: int = 0,
    theta: float = 10000.0,
    rope: Sequence[RopeTable] | None = None,
) -> tuple[bytes, str]:
    """(file bytes, hash) of a random artifact, registered in `ARTIFACTS`. `rope`: the
    RoPE table of each layer (default: plain RoPE of base `theta` for every layer)."""
    rng = np.random.default_rng(seed)
    inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    if rope is None:
        rope = [RopeTable(inv_freq) for _ in range(num_layers)]
    built = []
    for layers in groups:
        dim = len(layers) * kv_heads * head_dim
        rank = max(1, int(dim * rank_fraction))
        built.append(
            GroupTransform(tuple(layers), _side(rng, dim, rank, step), _side(rng, dim, rank, step))
        )
    artifact = TransformArtifact(
        model="test",
        shape=ModelShape(num_layers, kv_heads, head_dim),
        rope=tuple(rope),
        groups=tuple(built),
        coder=coder,
        calibration={"note": "random test artifact"},
    )
    data = encode_artifact(artifact)
    return data, ARTIFACTS.add(data)


def transform_policy(
    digest: str,
    groups: Sequence[Sequence[int]] = ((0, 1), (2, 3)),
    sink_tokens: int = 2,
    window: int = 4,
    name: str = "transform_test",
) -> CompressionPolicy:
    plan = TransformPlan(digest, tuple(tuple(g) for g in groups), sink_tokens, window)
    return CompressionPolicy(name, transform=plan)
