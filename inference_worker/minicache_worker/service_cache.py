"""A transformers Cache whose KV lives in the cache service.

One `ServiceCache` serves one forward pass or a run of them (a turn) of one sequence:

- history: tokens [0, history_tokens) come from a `LayerFeed`, a prefetch read on a
  background thread; layer i's `update` waits for layer i only, so the prefetch of the
  deeper layers overlaps the computation of the shallower ones;
- new tokens: each layer's new KV goes to a `SequenceWriter` as soon as the layer has
  computed it; the writer sends it from its own thread (a prefill's streamed put, so the
  wire overlaps the next layer's computation; decode steps when the writer is flushed:
  each step in remote residency, the turn's steps at its end in local residency);
- residency: between decode steps the layers keep their KV (local residency), or
  `reload` drops it and the next step reads the whole history back from the service
  (remote residency).

A history that cannot be read (a miss, a dead server, a failed checksum) raises
`HistoryUnavailableError` out of the forward pass; the caller recomputes. A failed write
only stops the writer: the model's tokens are unaffected, and the failure is reported
by `SequenceWriter.flush`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from minicache_client import CacheClient, CacheError, ShardedCacheClient
from minicache_client.tensors import to_torch

log = logging.getLogger(__name__)

# What the worker reads and writes KV through: the sharded client the worker service
# builds (one server or several), or one server's client; the calls are the same.
KVClient = CacheClient | ShardedCacheClient


def token_digest(tokens: Sequence[int]) -> bytes:
    """The content tag of a sequence's KV: a digest of its token ids. A cached sequence
    is used only for a history whose leading tokens have the same digest."""
    return hashlib.blake2b(np.asarray(tokens, dtype="<i4").tobytes(), digest_size=16).digest()


class HistoryUnavailableError(Exception):
    """The cache service could not give back a layer of the history; `cause` says why."""

    def __init__(self, layer: int, cause: BaseException) -> None:
        super().__init__(f"layer {layer} of the history is unavailable: {cause}")
        self.layer = layer
        self.cause = cause


class LayerFeed:
    """Tokens [0, end_token) of every layer of a sequence, read layer by layer on a
    background thread (`start`); `wait(layer)` blocks until that layer has arrived.

    keys/values come back as torch tensors `[1, kv_heads, end_token, head_dim]` in
    `torch_dtype`.
    """

    def __init__(
        self,
        client: KVClient,
        model_id: str,
        sequence_id: str,
        *,
        end_token: int,
        dtype: str,
        torch_dtype: torch.dtype,
        timeout_s: float | None = None,
    ) -> None:
        self.end_token = end_token
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._error: BaseException | None = None
        self._done = False
        self._stop = False
        self._arrived = threading.Condition()
        self._read = lambda: client.prefetch(
            model_id, sequence_id, end_token=end_token, dtype=dtype, timeout_s=timeout_s
        )
        self._dtype = dtype
        self._torch_dtype = torch_dtype
        self._thread = threading.Thread(target=self._run, name="layer-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for layer, keys, values in self._read():
                tensors = (
                    to_torch(keys, self._dtype).to(self._torch_dtype).unsqueeze(0),
                    to_torch(values, self._dtype).to(self._torch_dtype).unsqueeze(0),
                )
                with self._arrived:
                    self._layers[layer] = tensors
                    self._arrived.notify_all()
                    if self._stop:
                        return
        except Exception as exc:  # handed to the forward pass that waits for a layer
            with self._arrived:
                self._error = exc
        finally:
            with self._arrived:
                self._done = True
                self._arrived.notify_all()

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._arrived:
            while layer not in self._layers and not self._done:
                self._arrived.wait()
            if layer in self._layers:
                return self._layers.pop(layer)
            cause = self._error or CacheError(f"the prefetch ended without layer {layer}")
        raise HistoryUnavailableError(layer, cause)

    def close(self) -> None:
        """Stop reading after the layer in flight (the call's deadline bounds it)."""
        with self._arrived:
            self._stop = True
            self._layers.clear()


class SequenceWriter:
    """Sends a sequence's new KV to the cache service, in order, from one thread.

    `start_put(start_token, tokens, tag)` opens a streamed put (a prefill; from token 0
    it writes the sequence with `policy`), then `layer(...)` for each layer, `end_put()`;
    decode steps call `layer(...)` with one token per layer and `end_step(start_token,
    tag)`, which keeps the step: `flush()` sends the steps kept so far, one step in an
    Append, several in one streamed put. A turn that keeps its decode steps until it
    ends leaves the service holding exactly its input while it generates, so a retry of
    the turn elsewhere after this worker died resumes from it (`already_held`);
    `abort_put` drops the steps not sent. `tag` labels the sequence's content after the
    write (the digest of its token ids, `token_digest`). After the first failure the
    writer drops everything else and `flush()` returns the error: the service then holds
    a prefix of the sequence (puts and appends are atomic), which the next turn extends.
    """

    def __init__(
        self,
        client: KVClient,
        model_id: str,
        sequence_id: str,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: str,
        policy: str = "",
        stream_timeout_s: float | None = None,
    ) -> None:
        self.client = client
        self.stream_timeout_s = stream_timeout_s
        self.model_id = model_id
        self.sequence_id = sequence_id
        self.shape = {"num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim}
        self.dtype = dtype
        self._torch_dtype = getattr(torch, dtype)
        self.policy = policy
        self.held_tokens: int | None = None  # tokens the service acknowledged
        self.failure: BaseException | None = None
        self._put = None
        self._step: list[tuple[Any, Any] | None] = [None] * num_layers
        # Decode steps kept for the next flush: (start token, layers, tag).
        self._steps: list[tuple[int, list[tuple[Any, Any]], bytes]] = []
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sequence-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self.failure is None or job == self._abort_open_put:
                    job()
            except Exception as exc:
                self.failure = exc
                if self._put is not None:
                    self._put.abort()
                    self._put = None
                log.warning(
                    "writing %s to the cache service failed: %s; the rest of this turn "
                    "is not stored",
                    self.sequence_id,
                    exc,
                )
            finally:
                self._jobs.task_done()

    def start_put(self, start_token: int, tokens: int, tag: bytes) -> None:
        def open_put() -> None:
            self._put = self.client.open_put(
                self.model_id,
                self.sequence_id,
                **self.shape,
                dtype=self.dtype,
                start_token=start_token,
                end_token=start_token + tokens,
                policy=self.policy if start_token == 0 else "",
                seal=True,
                tag=tag,
                timeout_s=self.stream_timeout_s,  # the stream lasts as long as the prefill
            )

        self._step = None
        self._jobs.put(open_put)

    def layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values `[kv_heads, tokens, head_dim]` of this layer's new tokens, in the
        model's dtype (converted to the writer's here)."""
        keys, values = keys.to(self._torch_dtype), values.to(self._torch_dtype)
        if self._step is None:
            self._jobs.put(lambda: self._put.send_layer(layer, keys, values))
        else:
            self._step[layer] = (keys, values)

    def end_put(self) -> None:
        def finish() -> None:
            result = self._put.finish()
            self._put = None
            self.held_tokens = result.tokens

        self._jobs.put(finish)
        self._step = [None] * self.shape["num_layers"]

    def already_held(self, tokens: int) -> None:
        """The service holds the first `tokens` tokens already (a retried turn whose input
        was stored): nothing is put, decode steps extend the sequence from there."""
        self.held_tokens = tokens
        self._step = [None] * self.shape["num_layers"]

    def abort_put(self) -> None:
        """Cancel the open put and drop the decode steps not sent: the service keeps
        what it held before them."""
        self._jobs.put(self._abort_open_put)
        self._step = [None] * self.shape["num_layers"]
        self._steps = []

    def _abort_open_put(self) -> None:
        """The job of `abort_put`. It runs after a failure too, and forgets it: the failure
        was the cancelled put's (say, an extension of a history the service has just
        dropped as corrupt), and what follows, a recompute's put from token 0, starts
        afresh."""
        if self._put is not None:
            self._put.abort()
            self._put = None
        self.failure = None

    def end_step(self, start_token: int, tag: bytes) -> None:
        """Keep the decode step whose layers `layer(...)` gave, for the next `flush`."""
        layers, self._step = self._step, [None] * self.shape["num_layers"]
        if any(entry is None for entry in layers):
            raise RuntimeError("a decode step ended before every layer computed its KV")
        if self._steps and start_token != self._steps[-1][0] + 1:
            raise RuntimeError(f"decode step at token {start_token} does not follow the last")
        self._steps.append((start_token, layers, tag))

    def _send_steps(self) -> None:
        """Queue the decode steps kept so far as one write."""
        if not self._steps:
            return
        steps, self._steps = self._steps, []
        start_token, tag = steps[0][0], steps[-1][2]
        layers = [
            tuple(torch.cat([step[1][layer][side] for step in steps], dim=1) for side in (0, 1))
            for layer in range(self.shape["num_layers"])
        ]
        arguments = {"dtype": self.dtype, "start_token": start_token, "tag": tag}

        def write() -> None:
            if len(steps) == 1:
                result = self.client.append(self.model_id, self.sequence_id, layers, **arguments)
            else:  # beyond one message's size for long turns: a stream
                result = self.client.put(
                    self.model_id,
                    self.sequence_id,
                    layers,
                    **arguments,
                    timeout_s=self.stream_timeout_s,
                )
            self.held_tokens = result.tokens

        self._jobs.put(write)

    def flush(self) -> BaseException | None:
        """Send the decode steps kept, wait until everything queued was sent; the first
        failure, if any."""
        self._send_steps()
        self._jobs.join()
        return self.failure

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class ServiceLayer(DynamicLayer):
    """One layer: history from the feed on first use, new KV to the writer."""

    def __init__(self, cache: ServiceCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError("a service cache holds one sequence: batch size must be 1")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            feed = self.cache.feed
            if feed is not None and feed.end_token > 0:
                self.keys, self.values = feed.wait(self.layer_idx)
        if self.cache.writer is not None:
            self.cache.writer.layer(self.layer_idx, key_states[0], value_states[0])
        return super().update(key_states, value_states)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            # Asked before the forward pass that reads the history in.
            return self.cache.feed.end_token if self.cache.feed is not None else 0
        return super().get_seq_length()


class ServiceCache(Cache):
    """Pass as `past_key_values`; one sequence, batch size 1.

    `feed`: the history to read in (None: none); `writer`: where new KV goes (None: the
    cache keeps it locally only, as after the service failed).
    """

    def __init__(
        self, num_layers: int, feed: LayerFeed | None, writer: SequenceWriter | None
    ) -> None:
        super().__init__(layers=[ServiceLayer(self, index) for index in range(num_layers)])
        self.feed = feed
        self.writer = writer

    def reload(self, feed: LayerFeed) -> None:
        """Drop every layer's KV; the next forward pass reads the history from `feed`
        (remote residency: the worker holds no KV between steps)."""
        if self.feed is not None:
            self.feed.close()
        self.feed = feed
        for layer in self.layers:
            layer.reset()

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
