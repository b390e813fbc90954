"""One turn of a session: restore the history's KV from the cache service, prefill the
new tokens, generate greedily, and store every computed token's KV back.

`TurnGenerator.generate(request)` yields the generated token ids as they are chosen,
then one `TurnSummary`. The history's KV comes from the cache service when it holds a
prefix of the history; otherwise (a miss, a dead server, a failed checksum, a cached
sequence longer than the history) the worker recomputes it, logs why and counts it,
and the tokens are the same as with a fresh cache. Without a cache client at all the
worker generates with a plain local cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers.cache_utils import DynamicCache

from minicache_client import (
    CacheError,
    CorruptDataError,
    NotFoundError,
    UnreachableServerError,
)
from minicache_worker.models import LoadedModel
from minicache_worker.service_cache import (
    HistoryUnavailableError,
    KVClient,
    LayerFeed,
    SequenceWriter,
    ServiceCache,
    token_digest,
)
from minicache_worker.worker_metrics import WorkerMetrics

log = logging.getLogger(__name__)

TORCH_KV_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class Residency(str, Enum):
    """Where a turn's KV lives while it generates."""

    LOCAL = "local"  # in the worker during the turn; the service holds the durable copy
    REMOTE = "remote"  # in the service only: every decode step prefetches the history


class RecomputeReason(str, Enum):
    NONE = ""
    MISS = "miss"  # the service does not hold the session
    UNAVAILABLE = "unavailable"  # the service did not answer (down, deadline, refused)
    CORRUPT = "corrupt"  # a stored entry failed its checksum
    MISMATCH = "mismatch"  # the service holds more tokens than the history has


@dataclass(frozen=True)
class TurnRequest:
    """`history_tokens`: every token of the session so far; `new_tokens`: the tokens of
    this turn's input (at least one token in all)."""

    session_id: str
    history_tokens: Sequence[int]
    new_tokens: Sequence[int]
    max_new_tokens: int
    policy: str = ""
    residency: Residency = Residency.LOCAL

    @property
    def input_tokens(self) -> list[int]:
        return [*self.history_tokens, *self.new_tokens]


@dataclass
class TurnSummary:
    turn_tokens: list[int]  # new_tokens + generated: append to history for the next turn
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    recompute_reason: RecomputeReason = RecomputeReason.NONE
    stored: bool = False
    residency: Residency = Residency.LOCAL
    stored_tokens: int = 0
    errors: list[str] = field(default_factory=list)


def recompute_reason(error: BaseException) -> RecomputeReason:
    if isinstance(error, HistoryUnavailableError):
        error = error.cause
    if isinstance(error, UnreachableServerError):  # an outage, not an absent sequence
        return RecomputeReason.UNAVAILABLE
    if isinstance(error, NotFoundError):
        return RecomputeReason.MISS
    if isinstance(error, CorruptDataError):
        return RecomputeReason.CORRUPT
    return RecomputeReason.UNAVAILABLE


class TurnGenerator:
    """Generates turns of sessions with one model; one turn at a time per instance.

    `client` None: no cache service (plain local generation). `kv_dtype`: the dtype KV
    travels in (default: the model's, so policy `none` is lossless). Lookups and
    appends use the client's deadline; a prefill's streamed put and a history's prefetch
    last as long as the prefill computes, so they get `stream_timeout_s`.
    """

    def __init__(
        self,
        lm: LoadedModel,
        client: KVClient | None,
        *,
        model_id: str | None = None,
        kv_dtype: str | None = None,
        metrics: WorkerMetrics | None = None,
        stream_timeout_s: float = 300.0,
    ) -> None:
        self.lm = lm
        self.stream_timeout_s = stream_timeout_s
        self.client = client
        self.model_id = model_id or lm.name
        self.torch_dtype = lm.model.dtype
        self.kv_dtype = kv_dtype or TORCH_KV_DTYPES[self.torch_dtype]
        if self.kv_dtype not in TORCH_KV_DTYPES.values():
            raise ValueError(
                f"kv_dtype must be one of {sorted(TORCH_KV_DTYPES.values())}, got {kv_dtype!r}"
            )
        self.metrics = metrics or WorkerMetrics()
        self.max_positions = getattr(
            lm.model.config.get_text_config(decoder=True), "max_position_embeddings", None
        )
        eos = lm.model.generation_config.eos_token_id
        self.stop_tokens = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    # -- the turn ---------------------------------------------------------------------

    def generate(self, request: TurnRequest) -> Iterator[int | TurnSummary]:
        """Token ids as they are generated, then the turn's `TurnSummary`."""
        tokens = request.input_tokens
        self._check(request, tokens)
        started = time.perf_counter()
        residency = request.residency if self.client is not None else Residency.LOCAL
        summary = TurnSummary(turn_tokens=list(request.new_tokens), residency=residency)
        held = self._held_tokens(request, len(tokens), summary)
        writer = self._writer(request)
        cache = None
        try:
            cache, logits = self._prefill(request, tokens, held, writer, summary)
            summary.time_to_first_token_s = time.perf_counter() - started
            self.metrics.time_to_first_token.observe(
                summary.time_to_first_token_s, resumed=str(summary.cached_tokens > 0).lower()
            )
            decode_started = time.perf_counter()
            position = len(tokens)
            for step in range(request.max_new_tokens):
                token = int(logits[0, -1].argmax())
                summary.turn_tokens.append(token)
                summary.generated_tokens += 1
                yield token
                if token in self.stop_tokens or step == request.max_new_tokens - 1:
                    break
                cache, logits = self._decode_step(request, cache, token, position, writer, summary)
                position += 1
            if summary.generated_tokens > 1:
                summary.decode_tokens_per_s = (summary.generated_tokens - 1) / (
                    time.perf_counter() - decode_started
                )
        except BaseException:
            # Failed, or closed by the caller: a put in flight is cancelled, so the
            # service keeps the prefix it had acknowledged.
            if writer is not None:
                writer.abort_put()
            raise
        finally:
            if isinstance(cache, ServiceCache):
                cache.close()
            # Every input token and every generated token but the last went through the
            # model; the next turn starts by computing that last one.
            self._finish_writer(writer, summary, len(tokens) + summary.generated_tokens - 1)
        self.metrics.turns.inc(residency=residency.value)
        self.metrics.prefilled_tokens.inc(summary.prefilled_tokens)
        self.metrics.generated_tokens.inc(summary.generated_tokens)
        yield summary

    def _check(self, request: TurnRequest, tokens: list[int]) -> None:
        if not request.new_tokens and not request.history_tokens:
            raise ValueError("a turn needs at least one input token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        vocab = self.lm.model.config.get_text_config(decoder=True).vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if self.max_positions and len(tokens) + request.max_new_tokens > self.max_positions:
            raise ValueError(
                f"{len(tokens)} input tokens + max_new_tokens {request.max_new_tokens} exceed "
                f"the model's context of {self.max_positions} tokens"
            )

    def _held_tokens(self, request: TurnRequest, total: int, summary: TurnSummary) -> int:
        """How many leading tokens of the input the service can give back (0: none)."""
        if self.client is None or not request.history_tokens:
            return 0  # a first turn has no history to restore (it replaces a stale one)
        try:
            cached = self.client.lookup(self.model_id, request.session_id)
        except CacheError as exc:
            self._recompute(summary, recompute_reason(exc), exc)
            return 0
        held = cached.tokens
        if held > total:
            # Longer than the input: another turn's (or generated tokens), whose first
            # tokens' digest the service does not keep.
            self._recompute(
                summary,
                RecomputeReason.MISMATCH,
                f"the service holds {held} tokens, the input has {total}",
            )
            return 0
        # held == total: this turn's input, stored by an earlier try of the same turn
        # (a worker that died while it generated: it keeps its decode steps until the
        # turn ends). The tag tells.
        if cached.tag != token_digest(request.input_tokens[:held]):
            self._recompute(
                summary,
                RecomputeReason.MISMATCH,
                f"the {held} cached tokens are not the history's first {held} (an edited "
                "or branched conversation)",
            )
            return 0
        return held

    def _recompute(self, summary: TurnSummary, reason: RecomputeReason, cause: object) -> None:
        if reason is not RecomputeReason.MISS:
            log.warning("recomputing the history (%s): %s", reason.value, cause)
            summary.errors.append(f"{reason.value}: {cause}")
        summary.recompute_reason = reason
        self.metrics.recomputes.inc(reason=reason.value)

    def _writer(self, request: TurnRequest) -> SequenceWriter | None:
        if self.client is None:
            return None
        return SequenceWriter(
            self.client,
            self.model_id,
            request.session_id,
            num_layers=self.lm.num_layers,
            kv_heads=self.lm.kv_heads,
            head_dim=self.lm.head_dim,
            dtype=self.kv_dtype,
            policy=request.policy,
            stream_timeout_s=self.stream_timeout_s,
        )

    def _feed(self, session_id: str, end_token: int) -> LayerFeed:
        return LayerFeed(
            self.client,
            self.model_id,
            session_id,
            end_token=end_token,
            dtype=self.kv_dtype,
            torch_dtype=self.torch_dtype,
            timeout_s=self.stream_timeout_s,
        )

    def _forward(self, cache, input_tokens: Sequence[int]) -> torch.Tensor:
        input_ids = torch.tensor([list(input_tokens)], dtype=torch.long)
        with torch.inference_mode():
            return self.lm.model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits

    def _prefill(
        self,
        request: TurnRequest,
        tokens: list[int],
        held: int,
        writer: SequenceWriter | None,
        summary: TurnSummary,
    ) -> tuple[ServiceCache | DynamicCache, torch.Tensor]:
        """Run tokens[held:] over the restored history; recompute all on failure. When
        the service holds the whole input, its last token runs again for its logits and
        is not written again."""
        restored = min(held, len(tokens) - 1)
        if restored:
            # The input held whole: its last token's forward writes nothing.
            whole = restored < held
            feed = self._feed(request.session_id, restored)
            cache = ServiceCache(self.lm.num_layers, feed, None if whole else writer)
            if not whole:
                writer.start_put(held, len(tokens) - held, token_digest(tokens))
            try:
                logits = self._forward(cache, tokens[restored:])
            except HistoryUnavailableError as exc:
                cache.close()
                writer.abort_put()
                self._recompute(summary, recompute_reason(exc), exc)
            else:
                if whole:
                    writer.already_held(held)
                    cache.writer = writer
                else:
                    writer.end_put()
                summary.cached_tokens = restored
                summary.prefilled_tokens = len(tokens) - restored
                self.metrics.resumed_turns.inc()
                return cache, logits
        cache = ServiceCache(self.lm.num_layers, None, writer) if writer else DynamicCache()
        if writer is not None:
            writer.start_put(0, len(tokens), token_digest(tokens))
        logits = self._forward(cache, tokens)
        if writer is not None:
            writer.end_put()
        summary.prefilled_tokens = len(tokens)
        return cache, logits

    def _decode_step(
        self,
        request: TurnRequest,
        cache: ServiceCache | DynamicCache,
        token: int,
        position: int,
        writer: SequenceWriter | None,
        summary: TurnSummary,
    ) -> tuple[ServiceCache | DynamicCache, torch.Tensor]:
        """One decode step of `token` at `position`. Remote residency reads the history
        back first; if it cannot, the history is recomputed and the turn goes on with a
        local cache that the service no longer follows."""
        if (
            request.residency is Residency.REMOTE
            and isinstance(cache, ServiceCache)
            and writer is not None
        ):
            failure = writer.flush()
            if failure is None:
                cache.reload(self._feed(request.session_id, position))
                try:
                    logits = self._forward(cache, [token])
                except HistoryUnavailableError as exc:
                    self._recompute(summary, recompute_reason(exc), exc)
                else:
                    writer.end_step(position, self._step_tag(request, summary))
                    return cache, logits
            else:
                self._recompute(summary, recompute_reason(failure), failure)
            return self._recompute_locally(request, token, position, summary)
        logits = self._forward(cache, [token])
        if writer is not None and isinstance(cache, ServiceCache):
            writer.end_step(position, self._step_tag(request, summary))
        return cache, logits

    @staticmethod
    def _step_tag(request: TurnRequest, summary: TurnSummary) -> bytes:
        """The tag of the sequence after a decode step: every token so far."""
        return token_digest([*request.history_tokens, *summary.turn_tokens])

    def _recompute_locally(
        self, request: TurnRequest, token: int, position: int, summary: TurnSummary
    ) -> tuple[DynamicCache, torch.Tensor]:
        tokens = [*request.input_tokens, *summary.turn_tokens[len(request.new_tokens) :]]
        cache = DynamicCache()
        self._forward(cache, tokens[:position])
        summary.prefilled_tokens += position
        return cache, self._forward(cache, [token])

    def _finish_writer(
        self, writer: SequenceWriter | None, summary: TurnSummary, computed_tokens: int
    ) -> None:
        if writer is None:
            return
        failure = writer.flush()
        writer.close()
        summary.stored_tokens = writer.held_tokens or 0
        summary.stored = summary.stored_tokens == computed_tokens
        if not summary.stored:
            # A failed write, or a turn that went on with a local cache after its
            # history could not be read back: either way the service lacks tokens.
            self.metrics.store_failures.inc()
        if failure is not None:
            summary.errors.append(f"store: {failure}")
