"""A transformers Cache whose history is held compressed by the MiniCache engine.

Each layer is a `DynamicLayer` (transformers 5.x contract) whose `keys`/`values` hold
the *restored* history. On `update`, the layer first brings its restored history up to
date with the store, hands the new tokens to the store (a merged pair is encoded when
its second layer arrives), and attends over restored history + the new tokens exactly
as computed. So the model only ever sees what a cache server would give back.

The store is anything with the `KVStore` methods; in-process it is the server's
`SequenceEncoder`.

Sliding-window layers (Gemma-3, Mistral, Qwen2 with `use_sliding_window`) keep their
whole history here too, unlike transformers' own `DynamicSlidingWindowLayer`, which
drops what left the window. That is still exact: the model builds a sliding layer's
mask with `create_sliding_window_causal_mask`, sized by `get_mask_sizes` (offset 0,
length = history + new tokens, as for a full layer) from absolute positions, so a query
at position p sees keys in (p - window, p] only. Every layer reports `is_sliding =
False` on purpose: a sliding layer's mask is then sized on layer 0, which holds as many
tokens as every other layer. tests/worker/test_gemma3.py checks the logits against the
model's own cache past the window.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

# KV is stored at 16-bit: the fp16 cache is the baseline every ratio refers to.
STORE_DTYPE = "float16"


class KVStore(Protocol):
    def put_layer(self, layer: int, keys: Any, values: Any, seal: bool = False) -> None: ...

    def restore_layer(
        self, layer: int, start: int = 0, end: int | None = None, dtype: str | None = None
    ) -> tuple[Any, Any]: ...

    def entry_for(self, layer: int) -> Any: ...


class CompressedLayer(DynamicLayer):
    """One layer: restored history on the torch side, compressed form in the store.

    `keys`/`values` are views of buffers that grow by doubling: a decode step writes
    its few tokens in place instead of copying the whole history.

    `seal_chunks`: a chunk of several tokens is a prefill and is sealed (its last,
    partial quantization block quantized at once). Without it, every chunk is stored
    as decode steps are: a chunk of a few tokens then stands for that many decode steps.
    """

    # Whole history on every layer, masks from absolute positions (module docstring).
    is_sliding = False

    def __init__(self, store: KVStore, layer_idx: int, seal_chunks: bool = True) -> None:
        super().__init__()
        self.store = store
        self.layer_idx = layer_idx
        self.seal_chunks = seal_chunks
        self.restored_tokens = 0
        self.frozen_tokens = 0  # leading restored tokens that can no longer change
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = (1, key_states.shape[1], 0, key_states.shape[-1])
        self._key_buffer = key_states.new_zeros(empty)
        self._value_buffer = value_states.new_zeros(empty)

    def _reserve(self, tokens: int) -> None:
        capacity = self._key_buffer.shape[-2]
        if tokens <= capacity:
            return
        grown = max(tokens, 2 * capacity, 256)
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], grown, old.shape[-1]))
            new[..., :capacity, :] = old
            setattr(self, name, new)

    def _write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = start + keys.shape[-2]
        self._reserve(end)
        self._key_buffer[..., start:end, :] = keys
        self._value_buffer[..., start:end, :] = values

    def _refresh_history(self) -> None:
        entry = self.store.entry_for(self.layer_idx)
        if entry.tokens == self.restored_tokens and entry.frozen_tokens <= self.frozen_tokens:
            return
        start = self.frozen_tokens
        keys, values = self.store.restore_layer(self.layer_idx, start, entry.tokens, STORE_DTYPE)
        self._write(start, torch.from_numpy(np.asarray(keys)), torch.from_numpy(np.asarray(values)))
        self.restored_tokens = entry.tokens
        self.frozen_tokens = entry.frozen_tokens

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError("the compressed cache holds one sequence: batch size must be 1")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._refresh_history()
        new_tokens = key_states.shape[-2]
        self.store.put_layer(
            self.layer_idx,
            key_states[0].detach().to(torch.float16).numpy(),
            value_states[0].detach().to(torch.float16).numpy(),
            seal=self.seal_chunks and new_tokens > 1,
        )
        # The new tokens attend as computed; the next refresh overwrites them with
        # what the store gives back.
        self._write(self.restored_tokens, key_states, value_states)
        end = self.restored_tokens + new_tokens
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # Asked before a forward pass, when the store already holds the last step's
        # tokens that this layer's restored copy will only fetch in `update`.
        return self.store.entry_for(self.layer_idx).tokens

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a compressed cache cannot be cropped: history is never re-encoded"
        )


class CompressedCache(Cache):
    """Pass as `past_key_values`; one instance per sequence."""

    def __init__(self, store: KVStore, num_layers: int, seal_chunks: bool = True) -> None:
        super().__init__(
            layers=[CompressedLayer(store, layer, seal_chunks) for layer in range(num_layers)]
        )
        self.store = store
