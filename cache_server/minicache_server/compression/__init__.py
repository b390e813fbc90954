"""The encoder: cross-layer merge, token retention and quantization of KV.

- `slerp_merge`: SLERP of two layers' directions, magnitudes kept (design.md §3).
- `retention`: which tokens of a merged pair stay unmerged.
- `quantization`: KIVI-style min/max quantization of token blocks.
- `layer_group_encoder`: one layer group's stored entry, built as tokens arrive.
- `sequence_encoder`: all layer groups of one sequence, per layer as layers arrive.

The decoder (restore) lives in the client SDK, `minicache_client.restore`, so that
both sides share the entry format of `minicache_client.entry`.
"""

from minicache_server.compression.layer_group_encoder import LayerGroupEncoder
from minicache_server.compression.sequence_encoder import SequenceEncoder

__all__ = ["LayerGroupEncoder", "SequenceEncoder"]
