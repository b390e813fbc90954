"""Compression methods as small codec classes, registered by name.

| codec | file | holds |
|---|---|---|
| `raw` | raw.py | one layer's tokens exactly |
| `kivi` | kivi.py | one layer, KIVI-style quantized (keys per channel, values per token) |
| `slerp` | slerp_merge.py | a pair of layers: MiniCache SLERP direction, magnitudes, retained tokens |
| `average` | average_merge.py | a pair of layers: their mean (the paper's baseline) |
| `transform` | transform.py | consecutive layers: calibrated cross-layer transform, quantized, entropy coded |

Beside them: `base.py` (the `Codec` interface, and `extend_tokens`, the growing token
buffers appends write into) and `kivi_kernels.py` (KIVI's compiled CPU kernels, used
by `kivi.py` on NumPy).

A policy (`minicache_client.policy`) names the codecs: a merge's `method` is a pair
codec's name, and its quantization chooses `kivi` (or `raw`) for each stream.
`codecs_for_group` turns one layer group of a policy into the codecs of its keys and
values. Adding a method is one new file with a `Codec` subclass, one line in
`CODECS`, and its rows in the test matrix (tests/unit/test_codec_matrix.py).
"""

from __future__ import annotations

from minicache_client.codecs.average_merge import AverageMerge
from minicache_client.codecs.base import Codec, CorruptEntryError
from minicache_client.codecs.kivi import KiviStream
from minicache_client.codecs.merged_pair import MergedPair
from minicache_client.codecs.raw import RawStream
from minicache_client.codecs.slerp_merge import SlerpMerge
from minicache_client.codecs.transform import TransformCoded
from minicache_client.policy import LayerGroup, Quantization

CODECS: dict[str, type[Codec]] = {
    codec.name: codec for codec in (RawStream, KiviStream, SlerpMerge, AverageMerge, TransformCoded)
}
PAIR_CODECS = tuple(name for name, codec in CODECS.items() if issubclass(codec, MergedPair))

KINDS = ("keys", "values")


def stream_codec(
    kind: str,
    bits: int | None,
    quantization: Quantization | None,
    *,
    dtype: str,
    kv_heads: int,
    head_dim: int,
) -> Codec:
    """The codec of one layer's keys or values: `raw`, or `kivi` at `bits`."""
    if bits is None:
        return RawStream(kv_heads, head_dim, dtype)
    if kind == "keys":
        mode, group_size = "per_channel", quantization.key_group_size
    else:
        mode, group_size = "per_token", min(quantization.value_group_size, head_dim)
    return KiviStream(
        kv_heads,
        head_dim,
        dtype,
        bits=bits,
        mode=mode,
        group_size=group_size,
        block_tokens=quantization.key_group_size,
        sink_capacity=quantization.sink_tokens,
        window=quantization.window,
    )


def codecs_for_group(
    group: LayerGroup,
    kind: str,
    quantization: Quantization | None,
    *,
    dtype: str,
    kv_heads: int,
    head_dim: int,
) -> list[Codec]:
    """The codecs of one side (`kind`) of a layer group, covering its layers in order."""
    shape = {"dtype": dtype, "kv_heads": kv_heads, "head_dim": head_dim}
    plan = group.transform
    if plan is not None:
        return [
            TransformCoded(
                **shape,
                artifact=plan.artifact,
                kind=kind,
                first_layer=group.layers[0],
                layer_total=len(group.layers),
                sink_capacity=plan.sink_tokens,
                window=plan.window,
            )
        ]
    bits = [quantization.bits_for(kind, layer) if quantization else None for layer in group.layers]
    merge = group.merge
    if merge is None or not getattr(merge, kind):
        return [stream_codec(kind, b, quantization, **shape) for b in bits]
    # The shared direction keeps the wider of its two layers' bit widths.
    direction = stream_codec(kind, None if None in bits else max(bits), quantization, **shape)
    return [CODECS[merge.method].for_pair(merge, direction)]


__all__ = [
    "CODECS",
    "KINDS",
    "PAIR_CODECS",
    "AverageMerge",
    "Codec",
    "CorruptEntryError",
    "KiviStream",
    "MergedPair",
    "RawStream",
    "SlerpMerge",
    "TransformCoded",
    "codecs_for_group",
    "stream_codec",
]
