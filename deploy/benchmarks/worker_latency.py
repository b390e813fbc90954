"""Latency of the inference worker with the cache service: resumed turns against
recomputing the history, decode speed under each KV residency, and the remote
residency's per-step cost against the wire.

At each history length (`--history-tokens`, default 1,024, 2,048 and 4,096 tokens of
Paul Graham essays) it measures, in one run, with the bundled model (`--model`) and an
in-process cache server (its own asyncio loop on a thread of this process, CPU device
tier; `--server process` runs a `minicache-server` process of the venv instead, so that
the server's Python work does not share the worker's GIL):

1. Time to first token (`TurnSummary.time_to_first_token_s`) of a turn of
   `--new-tokens` (32) new user tokens after the history:
   - `resumed`: the history is in the service (session written beforehand, see below);
     the turn reads it back layer by layer and prefills the new tokens only;
   - `recompute local`: `TurnGenerator` without a cache client (plain transformers
     `DynamicCache`): prefills history + new tokens;
   - `recompute miss`: through the service, on a session it does not hold (a fresh
     id): the lookup misses, and the worker prefills history + new tokens while
     streaming them to the service (`--skip-miss` leaves it out);
   - `first turn`: the turn that wrote the history (history prefill, streamed to the
     service), once per history length.
   `recompute/resumed` is the ratio of the medians; the target: at least 10x at 2,048
   tokens. Every turn is checked: a resumed turn must report `cached_tokens` equal to
   the history and prefill only the new tokens; a recompute must report 0 cached
   tokens (and, on a miss, the reason `miss`); else the run stops with an error.
2. Decode tokens/s over `--decode-tokens` (32) decode steps after the first token, in
   the same turns: `plain` (the `recompute local` turn), `service local` (the `resumed`
   turn: KV stays in the worker, each step's KV is appended to the service on the
   writer thread) and `service remote` (a second resumed turn with remote residency:
   every step first waits for the previous step's Append, then prefetches the whole
   history [0, position) of every layer from the service). Tokens/s is
   `TurnSummary.decode_tokens_per_s` (median over the repeats); a step's time is the
   time between two consecutive generated tokens (median over the turn's steps, then
   over the repeats). The generated tokens of the three modes must be identical with
   policy `none` and the model's KV dtype: checked on a short history before measuring
   (and at every history length); a difference prints a WARNING line. (Service local
   and remote run the same arithmetic; plain decoding prefilled history and new tokens
   in one pass, so float rounding could in principle tip a greedy choice.)
3. Remote residency's per-step overhead, `remote step - plain step`, next to `wire`:
   the time raw TCP loopback (`loopback.py`, a receiver process, measured in this run:
   a warm-up, then 5 runs of at least `--min-run-ms` each, the median) takes to move
   that step's bytes: the whole history [0, position) of every layer, keys and values,
   in the wire dtype (the KV dtype), plus the one appended token, at the middle decode
   step's position. `overhead/wire` is their ratio; the target:
   at most 1.5x. For the breakdown, `prefetch` times the service's prefetch of those
   tokens alone (the iterator of `CacheClient.prefetch`, plus the conversion to torch
   tensors that `LayerFeed` makes) and `append` one 1-token Append alone.

The history's KV reaches the service the way a first turn writes it, once per length:
a real first turn (its TTFT is the `first turn` figure) into one session; then, so that
each repeat does not cost a full prefill, every measured session gets the same KV with
one `CacheClient.put(..., policy, seal=True)` (what the first turn's streamed put sends)
of the history's KV computed locally with the model, under the content tag the first
turn left (the worker resumes only a session whose tag matches the history). With policy `none` the script
checks that the first turn stored exactly that KV (bit for bit).

Each measured turn repeats `--repeats` (3) times, the modes interleaved (plain,
resumed local, resumed remote, miss); one warm-up round on a short history comes
first. The figures are medians. Progress goes to stderr, tables to stdout, `--json OUT`
writes every sample, the medians, the checks, the configuration and the machine (CPU
count, load average before and after, torch and transformers versions and threads,
model, dtypes).

Timings on a shared machine are noisy: the load average is printed with the results.
`--torch-threads` pins torch's intra-op threads (default: torch's choice); with other
CPU-heavy processes running, fewer threads than cores can be faster.

    python deploy/benchmarks/worker_latency.py
    python deploy/benchmarks/worker_latency.py --quick                     # smoke run
    python deploy/benchmarks/worker_latency.py --history-tokens 2048 --policy default \
        --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from loopback import TcpBaseline  # beside this script
except ImportError:  # imported from elsewhere: the module sits next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loopback import TcpBaseline
from arguments import positive_float, positive_int

if TYPE_CHECKING:  # torch, transformers and the worker load on first use
    from minicache_client import CacheClient
    from minicache_worker.generation import TurnGenerator, TurnSummary
    from minicache_worker.models import LoadedModel

KV_DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_HISTORIES = (1024, 2048, 4096)
QUICK_HISTORIES = (256, 512)
QUICK_DECODE_TOKENS = 4
WARMUP_HISTORY = 128
TTFT_TARGET = 10.0  # resumed at least 10x faster than recomputing ...
TTFT_TARGET_HISTORY = 2048  # ... at 2k tokens
OVERHEAD_TARGET = 1.5  # remote step overhead within 1.5x the wire time
SERVER_MODES = {
    "thread": "cache server in-process (asyncio loop on a thread), CPU device tier",
    "process": "cache server in a minicache-server process, CPU device tier",
}


class BenchmarkError(RuntimeError):
    """A turn did not do what the measurement assumes (a resume that recomputed...)."""


# -- arguments ------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what they mean)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Worker latency with the MiniCache service: TTFT of resumed turns "
        "against recomputing the history, decode tokens/s under local and remote KV "
        "residency, and the remote step's overhead against raw TCP loopback.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--history-tokens",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help=f"history lengths in tokens (default {' '.join(map(str, DEFAULT_HISTORIES))}; "
        f"with --quick {' '.join(map(str, QUICK_HISTORIES))})",
    )
    parser.add_argument(
        "--new-tokens", type=positive_int, default=32, help="new user tokens of the turn"
    )
    parser.add_argument(
        "--decode-tokens",
        type=positive_int,
        default=None,
        help=f"decode steps timed after the first token (default 32; with --quick "
        f"{QUICK_DECODE_TOKENS})",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="measured rounds per history length (default 3; with --quick 1)",
    )
    parser.add_argument(
        "--policy",
        default="none",
        help="compression policy of the sessions: a preset name (none, default, kivi4, "
        "...) or a policy JSON file",
    )
    parser.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default=None,
        help="dtype KV travels and is stored in (default: the model's, lossless)",
    )
    parser.add_argument("--model", default="smollm2", help="model for load_model()")
    parser.add_argument(
        "--skip-miss",
        action="store_true",
        help="leave out the recompute through the service on a miss",
    )
    parser.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    parser.add_argument(
        "--min-run-ms",
        type=positive_float,
        default=200.0,
        help="a raw TCP loopback run repeats the transfer until this long and counts the mean",
    )
    parser.add_argument(
        "--server",
        choices=["thread", "process"],
        default="thread",
        help="cache server in this process (its own asyncio loop on a thread, sharing the "
        "GIL with the worker) or a minicache-server process of this venv",
    )
    parser.add_argument(
        "--device-budget-gib",
        type=positive_float,
        default=4.0,
        help="device budget of the in-process cache server, in GiB",
    )
    parser.add_argument(
        "--timeout-s",
        type=positive_float,
        default=600.0,
        help="deadline of every SDK call (a streamed put lasts a whole prefill)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: histories {' '.join(map(str, QUICK_HISTORIES))}, "
        f"{QUICK_DECODE_TOKENS} decode tokens, 1 repeat (flags given explicitly win)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write every figure as JSON to OUT")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.history_tokens is None:
        args.history_tokens = list(QUICK_HISTORIES if args.quick else DEFAULT_HISTORIES)
    args.history_tokens = sorted(dict.fromkeys(args.history_tokens))
    if args.decode_tokens is None:
        args.decode_tokens = QUICK_DECODE_TOKENS if args.quick else 32
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    from minicache_client.policy import PRESETS, load_policy

    try:
        policy = load_policy(args.policy)
    except ValueError as exc:
        parser.error(f"--policy {args.policy}: {exc}")
    # A preset travels by name, a file as its JSON (the request's policy field).
    args.policy_name = args.policy if args.policy in PRESETS else policy.name
    args.policy_arg = args.policy if args.policy in PRESETS else policy.to_json()
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: folder {folder} does not exist")
    return args


# -- helpers --------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    if not (denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator)):
        return float("nan")
    return numerator / denominator


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


class ServerThread:
    """An in-process cache server on its own asyncio loop, in a daemon thread."""

    def __init__(self, settings: Any) -> None:
        from minicache_server.service.server import start_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="cache-server", daemon=True
        )
        self.thread.start()
        try:
            self.server = self.call(start_server(settings))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.address = f"127.0.0.1:{self.server.port}"

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `minicache-server` process of this interpreter's venv (CPU device tier)."""

    def __init__(self, budget_bytes: int, workdir: str) -> None:
        from minicache_client import CacheClient, CacheError, ClientConfig

        binary = Path(sys.executable).with_name("minicache-server")
        if not binary.is_file():
            raise BenchmarkError(f"{binary} not found: install cache_server into this venv")
        self.address = f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
        env.update(
            {
                "MINICACHE_INSECURE": "1",
                "MINICACHE_LISTEN": self.address,
                "MINICACHE_METRICS_LISTEN": "",
                "MINICACHE_DEVICE": "cpu",
                "MINICACHE_DEVICE_BUDGET_BYTES": str(budget_bytes),
                "MINICACHE_LOG_LEVEL": "WARNING",
                "MINICACHE_LOG_FORMAT": "text",
            }
        )
        self.log_path = os.path.join(workdir, "server.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        with CacheClient(ClientConfig(target=self.address, insecure=True, timeout_s=2)) as probe:
            while True:
                if self.process.poll() is not None:
                    raise BenchmarkError(
                        f"minicache-server exited with {self.process.returncode}: {self.log_tail()}"
                    )
                try:
                    if probe.health() == "SERVING":
                        return
                except CacheError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchmarkError(f"minicache-server did not serve on {self.address}")
                time.sleep(0.1)

    def log_tail(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class TurnRun:
    """A turn's generated tokens, its summary, and the seconds of each decode step (the
    time between two consecutive generated tokens)."""

    tokens: list[int]
    summary: TurnSummary
    step_seconds: list[float]

    @property
    def median_step(self) -> float:
        return median(self.step_seconds)


def run_turn(generator: TurnGenerator, request: Any) -> TurnRun:
    from minicache_worker.generation import TurnSummary

    tokens: list[int] = []
    stamps: list[float] = []
    summary = None
    for item in generator.generate(request):
        if isinstance(item, TurnSummary):
            summary = item
        else:
            stamps.append(time.perf_counter())
            tokens.append(item)
    if summary is None:
        raise BenchmarkError("the turn ended without a summary")
    steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return TurnRun(tokens, summary, steps)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkError(message)


def check_turn(
    what: str,
    run: TurnRun,
    *,
    cached: int,
    prefilled: int,
    reason: str = "",
    stored_tokens: int | None = None,
) -> None:
    """Fail loudly unless the turn resumed or recomputed as the measurement assumes."""
    summary = run.summary
    expect(
        not summary.errors,
        f"{what}: the turn reported errors: {summary.errors}",
    )
    why = "a resumed turn restores the whole history" if cached else "a recompute restores none"
    expect(
        summary.cached_tokens == cached,
        f"{what}: cached_tokens {summary.cached_tokens}, expected {cached} ({why})",
    )
    expect(
        summary.prefilled_tokens == prefilled,
        f"{what}: prefilled_tokens {summary.prefilled_tokens}, expected {prefilled}",
    )
    expect(
        summary.recompute_reason.value == reason,
        f"{what}: recompute_reason {summary.recompute_reason.value!r}, expected {reason!r}",
    )
    if stored_tokens is not None:
        expect(
            summary.stored and summary.stored_tokens == stored_tokens,
            f"{what}: the service holds {summary.stored_tokens} tokens (stored="
            f"{summary.stored}), expected {stored_tokens}",
        )


# -- the run --------------------------------------------------------------------------


@dataclass
class Bench:
    """What every measurement uses."""

    args: argparse.Namespace
    lm: LoadedModel
    client: CacheClient
    plain: TurnGenerator
    service: TurnGenerator
    tcp: TcpBaseline
    text_tokens: list[int]
    kv_dtype: str
    model_dtype: str
    bytes_per_token: int  # wire bytes of one token, every layer, keys + values
    warnings: list[str] = field(default_factory=list)
    _sessions: int = 0

    def session_id(self, kind: str, history: int) -> str:
        self._sessions += 1
        return f"bench-{os.getpid()}-{kind}-{history}-{self._sessions}"

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"WARNING: {message}", flush=True)

    def request(self, session: str, history: list[int], new: list[int], **fields: Any) -> Any:
        from minicache_worker.generation import TurnRequest

        return TurnRequest(
            session_id=session,
            history_tokens=history,
            new_tokens=new,
            policy=self.args.policy_arg,
            **fields,
        )

    def history_kv(self, history: list[int]) -> list[tuple[Any, Any]]:
        """The history's KV, computed locally: per layer (keys, values) `[kv_heads,
        tokens, head_dim]` in the KV dtype, as the first turn's put sends them."""
        import torch
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode():
            self.lm.model(
                input_ids=torch.tensor([history], dtype=torch.long),
                past_key_values=cache,
                use_cache=True,
            )
        dtype = getattr(torch, self.kv_dtype)
        return [
            (layer.keys[0].to(dtype).contiguous(), layer.values[0].to(dtype).contiguous())
            for layer in cache.layers
        ]

    def put_history(
        self, session: str, kv: list[tuple[Any, Any]], tokens: int, tag: bytes | None
    ) -> None:
        """A copy of the first turn's session: the same KV, policy and content tag."""
        extra = {} if tag is None else {"tag": tag}
        answer = self.client.put(
            self.lm.name,
            session,
            kv,
            dtype=self.kv_dtype,
            policy=self.args.policy_arg,
            seal=True,
            **extra,
        )
        expect(answer.tokens == tokens, f"put of the history: the service holds {answer.tokens}")

    def stored_equals(self, session: str, kv: list[tuple[Any, Any]]) -> bool:
        import numpy as np

        from minicache_client.tensors import as_carrier

        stored = self.client.prefetch(self.lm.name, session, dtype=self.kv_dtype)
        for (_, keys, values), (want_keys, want_values) in zip(stored, kv, strict=True):
            if not (
                np.array_equal(keys, as_carrier(want_keys, self.kv_dtype))
                and np.array_equal(values, as_carrier(want_values, self.kv_dtype))
            ):
                return False
        return True

    def feed_seconds(self, session: str, end_token: int) -> tuple[float, float]:
        """Seconds of the service's prefetch of [0, end_token) of every layer alone, and
        of converting it to torch tensors as `LayerFeed` does."""
        from minicache_client.tensors import to_torch

        torch_dtype = self.lm.model.dtype
        wire = convert = 0.0
        arrived = time.perf_counter()
        for _, keys, values in self.client.prefetch(
            self.lm.name, session, end_token=end_token, dtype=self.kv_dtype
        ):
            now = time.perf_counter()
            wire += now - arrived
            to_torch(keys, self.kv_dtype).to(torch_dtype).unsqueeze(0)
            to_torch(values, self.kv_dtype).to(torch_dtype).unsqueeze(0)
            arrived = time.perf_counter()
            convert += arrived - now
        return wire, convert

    def append_seconds(self, session: str, held: int) -> float:
        """Seconds of one 1-token Append of every layer (zeros) to a session of `held`
        tokens."""
        import numpy as np

        from minicache_client.wire import carrier_of

        shape = (self.lm.kv_heads, 1, self.lm.head_dim)
        token = np.zeros(shape, dtype=carrier_of(self.kv_dtype))
        layers = [(token, token)] * self.lm.num_layers
        start = time.perf_counter()
        answer = self.client.append(
            self.lm.name, session, layers, dtype=self.kv_dtype, start_token=held
        )
        seconds = time.perf_counter() - start
        expect(answer.tokens == held + 1, f"append: the service holds {answer.tokens}")
        return seconds


def texts_tokens(lm: LoadedModel, needed: int) -> list[int]:
    from minicache_worker import texts

    text = texts.split_text("evaluation")
    chars = needed * 8
    while True:
        ids = lm.tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise BenchmarkError(f"the essays give {len(ids)} tokens, {needed} needed")
    return ids


def turn_record(run: TurnRun) -> dict[str, Any]:
    summary = run.summary
    return {
        "cached_tokens": summary.cached_tokens,
        "prefilled_tokens": summary.prefilled_tokens,
        "generated_tokens": summary.generated_tokens,
        "recompute_reason": summary.recompute_reason.value,
        "stored_tokens": summary.stored_tokens,
        "time_to_first_token_s": summary.time_to_first_token_s,
        "decode_tokens_per_s": summary.decode_tokens_per_s,
    }


def lossless(bench: Bench) -> bool:
    """Policy none in the model's dtype: the service must give back exactly the KV."""
    return bench.args.policy_name == "none" and bench.kv_dtype == bench.model_dtype


def measure_history(bench: Bench, history_len: int, *, warmup: bool = False) -> dict[str, Any]:
    """Every figure at one history length (a warm-up round checks tokens only)."""
    from minicache_worker.generation import Residency

    args = bench.args
    new_len, decode = args.new_tokens, args.decode_tokens
    history = bench.text_tokens[:history_len]
    new = bench.text_tokens[history_len : history_len + new_len]
    total = history_len + new_len
    label = "warm-up" if warmup else f"{history_len} tokens"
    began = time.perf_counter()

    # The history's KV into the service, the way a first turn writes it.
    seed = bench.session_id("first", history_len)
    first = run_turn(bench.service, bench.request(seed, [], history, max_new_tokens=1))
    check_turn(
        f"{label}: first turn",
        first,
        cached=0,
        prefilled=history_len,
        stored_tokens=history_len,
    )
    # The content tag the worker gave the history (a digest of its tokens), if any: the
    # copies carry it too, or the worker would take them for another conversation's.
    tag = getattr(bench.client.lookup(bench.lm.name, seed), "tag", None)
    kv = bench.history_kv(history)
    bitwise = bench.stored_equals(seed, kv) if lossless(bench) else None
    if bitwise is False:
        bench.warn(
            f"{label}: the first turn stored other KV than the model computes for the history"
        )
    bench.client.delete(bench.lm.name, seed)
    progress(f"  {label}: first turn {first.summary.time_to_first_token_s:.2f} s")

    samples: dict[str, list] = {
        name: []
        for name in (
            "ttft_resumed",
            "ttft_resumed_remote",
            "ttft_recompute_local",
            "ttft_recompute_miss",
            "tokens_per_s_plain",
            "tokens_per_s_local",
            "tokens_per_s_remote",
            "step_s_plain",
            "step_s_local",
            "step_s_remote",
            "decode_steps",
            "prefetch_s",
            "convert_s",
            "append_s",
        )
    }
    # What each measured turn restored and prefilled, for the record (checked above).
    turns: dict[str, list] = {
        name: [] for name in ("plain", "resumed_local", "resumed_remote", "miss")
    }
    agreements = []  # plain, service local and service remote: the same tokens
    service_agreements = []  # service local and remote: the same tokens
    generated = {}
    repeats = 1 if warmup else args.repeats
    for repeat in range(repeats):
        plain = run_turn(
            bench.plain,
            bench.request(
                bench.session_id("plain", history_len), history, new, max_new_tokens=decode + 1
            ),
        )
        check_turn(f"{label}: plain turn", plain, cached=0, prefilled=total)

        runs = {}
        for residency in (Residency.LOCAL, Residency.REMOTE):
            session = bench.session_id(residency.value, history_len)
            bench.put_history(session, kv, history_len, tag)
            run = run_turn(
                bench.service,
                bench.request(
                    session, history, new, max_new_tokens=decode + 1, residency=residency
                ),
            )
            check_turn(
                f"{label}: resumed turn ({residency.value} residency)",
                run,
                cached=history_len,
                prefilled=new_len,
                stored_tokens=total + len(run.tokens) - 1,
            )
            if residency is Residency.REMOTE and not warmup:
                # The middle step's history: what a remote step reads, measured alone.
                held = run.summary.stored_tokens
                end = min(held, total + (decode - 1) // 2)
                wire, convert = bench.feed_seconds(session, end)
                samples["prefetch_s"].append(wire)
                samples["convert_s"].append(convert)
                samples["append_s"].append(bench.append_seconds(session, held))
            bench.client.delete(bench.lm.name, session)
            runs[residency] = run
        local, remote = runs[Residency.LOCAL], runs[Residency.REMOTE]

        if not args.skip_miss:
            session = bench.session_id("miss", history_len)
            miss = run_turn(bench.service, bench.request(session, history, new, max_new_tokens=1))
            check_turn(
                f"{label}: recompute on a miss",
                miss,
                cached=0,
                prefilled=total,
                reason="miss",
                stored_tokens=total,
            )
            bench.client.delete(bench.lm.name, session)
            samples["ttft_recompute_miss"].append(miss.summary.time_to_first_token_s)
            if miss.tokens[0] != plain.tokens[0] and lossless(bench):
                bench.warn(f"{label}: the miss turn's first token differs from the plain turn's")

        for name, run in (("plain", plain), ("resumed_local", local), ("resumed_remote", remote)):
            turns[name].append(turn_record(run))
        if not args.skip_miss:
            turns["miss"].append(turn_record(miss))
        agreements.append(plain.tokens == local.tokens == remote.tokens)
        service_agreements.append(local.tokens == remote.tokens)
        generated = {"plain": plain.tokens, "local": local.tokens, "remote": remote.tokens}
        samples["ttft_resumed"].append(local.summary.time_to_first_token_s)
        samples["ttft_resumed_remote"].append(remote.summary.time_to_first_token_s)
        samples["ttft_recompute_local"].append(plain.summary.time_to_first_token_s)
        for name, run in (("plain", plain), ("local", local), ("remote", remote)):
            if len(run.step_seconds) < decode:
                bench.warn(
                    f"{label}: the {name} turn stopped after {len(run.step_seconds)} of "
                    f"{decode} decode steps (end of sequence)"
                )
            if not run.step_seconds:
                raise BenchmarkError(f"{label}: the {name} turn made no decode step")
            samples[f"tokens_per_s_{name}"].append(run.summary.decode_tokens_per_s)
            samples[f"step_s_{name}"].append(run.median_step)
        samples["decode_steps"].append(len(remote.step_seconds))
        progress(
            f"  {label}, round {repeat + 1}/{repeats}: TTFT resumed "
            f"{local.summary.time_to_first_token_s:.3f} s, recompute "
            f"{plain.summary.time_to_first_token_s:.3f} s; decode tokens/s plain "
            f"{plain.summary.decode_tokens_per_s:.2f}, local "
            f"{local.summary.decode_tokens_per_s:.2f}, remote "
            f"{remote.summary.decode_tokens_per_s:.2f}"
        )

    identical = all(agreements)
    if not identical:
        message = f"{label}: the three decode modes generated different tokens"
        if lossless(bench):
            bench.warn(f"{message} (policy none, model dtype: they must be identical)")
        else:
            progress(f"  {message} (expected with a lossy policy or KV dtype)")
    if warmup:
        return {"tokens_identical": identical, "generated_tokens": generated}

    # Remote step bytes: history [0, position) of every layer plus the appended token,
    # at the middle decode step.
    position = total + (decode - 1) // 2
    wire_bytes = (position + 1) * bench.bytes_per_token
    loopback = bench.tcp.seconds_per_transfer(
        wire_bytes, max(5, args.repeats), args.min_run_ms / 1000
    )
    progress(f"  {label}: done in {time.perf_counter() - began:.1f} s")

    med = {name: median(values) for name, values in samples.items()}
    overhead = med["step_s_remote"] - med["step_s_plain"]
    wire_s = median(loopback)
    return {
        "history_tokens": history_len,
        "new_tokens": new_len,
        "input_tokens": total,
        "first_turn_ttft_s": first.summary.time_to_first_token_s,
        "history_stored_bitwise": bitwise,
        "samples": samples,
        "turns": turns,
        "ttft": {
            "resumed_s": med["ttft_resumed"],
            "resumed_remote_residency_s": med["ttft_resumed_remote"],
            "recompute_local_s": med["ttft_recompute_local"],
            "recompute_miss_s": med["ttft_recompute_miss"] if not args.skip_miss else None,
            "first_turn_s": first.summary.time_to_first_token_s,
            "recompute_over_resumed": ratio(med["ttft_recompute_local"], med["ttft_resumed"]),
            "miss_over_resumed": (
                ratio(med["ttft_recompute_miss"], med["ttft_resumed"])
                if not args.skip_miss
                else None
            ),
        },
        "decode": {
            "decode_steps": samples["decode_steps"],
            "tokens_per_s": {
                "plain": med["tokens_per_s_plain"],
                "service_local": med["tokens_per_s_local"],
                "service_remote": med["tokens_per_s_remote"],
            },
            "step_s": {
                "plain": med["step_s_plain"],
                "service_local": med["step_s_local"],
                "service_remote": med["step_s_remote"],
            },
            "local_over_plain": ratio(med["tokens_per_s_local"], med["tokens_per_s_plain"]),
            "remote_over_plain": ratio(med["tokens_per_s_remote"], med["tokens_per_s_plain"]),
            "tokens_identical": identical,
            "service_local_remote_identical": all(service_agreements),
            "generated_tokens": generated,
        },
        "remote_step": {
            "position": position,
            "wire_bytes": wire_bytes,
            "plain_step_s": med["step_s_plain"],
            "remote_step_s": med["step_s_remote"],
            "overhead_s": overhead,
            "loopback_seconds": loopback,
            "loopback_gbps": wire_bytes / wire_s / 1e9,
            "wire_s": wire_s,
            "overhead_over_wire": ratio(overhead, wire_s),
            "service_prefetch_s": med["prefetch_s"],
            "prefetch_convert_s": med["convert_s"],
            "service_append_s": med["append_s"],
            "prefetch_over_wire": ratio(med["prefetch_s"], wire_s),
        },
    }


# -- report ---------------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * 1000:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def ttft_verdict(result: dict[str, Any]) -> bool:
    return result["ttft"]["recompute_over_resumed"] >= TTFT_TARGET


def overhead_verdict(result: dict[str, Any]) -> bool | None:
    """None where the remote step measured no slower than the plain one (noise)."""
    step = result["remote_step"]
    if not step["overhead_s"] > 0:
        return None
    return step["overhead_over_wire"] <= OVERHEAD_TARGET


def format_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        t = r["ttft"]
        rows.append(
            (
                str(r["history_tokens"]),
                _s(t["resumed_s"]),
                _s(t["recompute_local_s"]),
                _s(t["recompute_miss_s"]),
                _s(t["first_turn_s"]),
                _x(t["recompute_over_resumed"]),
                _x(t["miss_over_resumed"]),
                "PASS" if ttft_verdict(r) else "MISS",
            )
        )
    ttft = _table(
        (
            "history",
            "resumed s",
            "recompute local s",
            "recompute miss s",
            "first turn s",
            "local/resumed",
            "miss/resumed",
            f">= {TTFT_TARGET:g}x",
        ),
        rows,
    )
    rows = []
    for r in results:
        d = r["decode"]
        rate, step = d["tokens_per_s"], d["step_s"]
        rows.append(
            (
                str(r["history_tokens"]),
                f"{_s(rate['plain'], 2)} ({_ms(step['plain'])})",
                f"{_s(rate['service_local'], 2)} ({_ms(step['service_local'])})",
                f"{_s(rate['service_remote'], 2)} ({_ms(step['service_remote'])})",
                _x(d["local_over_plain"]),
                _x(d["remote_over_plain"]),
                "yes" if d["tokens_identical"] else "NO",
            )
        )
    decode = _table(
        (
            "history",
            "plain tok/s (step ms)",
            "service local",
            "service remote",
            "local/plain",
            "remote/plain",
            "same tokens",
        ),
        rows,
    )
    rows = []
    for r in results:
        s = r["remote_step"]
        rows.append(
            (
                str(r["history_tokens"]),
                _ms(s["plain_step_s"]),
                _ms(s["remote_step_s"]),
                _ms(s["overhead_s"]),
                f"{s['wire_bytes'] / 2**20:.1f}",
                _s(s["loopback_gbps"], 2),
                _ms(s["wire_s"]),
                _x(s["overhead_over_wire"]),
                {True: "PASS", False: "MISS", None: "n/a"}[overhead_verdict(r)],
                _ms(s["service_prefetch_s"]),
                _ms(s["prefetch_convert_s"]),
                _ms(s["service_append_s"]),
            )
        )
    step = _table(
        (
            "history",
            "plain ms",
            "remote ms",
            "overhead ms",
            "step MiB",
            "loopback GB/s",
            "wire ms",
            "overhead/wire",
            f"<= {OVERHEAD_TARGET:g}x",
            "prefetch ms",
            "convert ms",
            "append ms",
        ),
        rows,
    )
    target_note = (
        f"target at {TTFT_TARGET_HISTORY} tokens"
        if TTFT_TARGET_HISTORY in args.history_tokens
        else f"target stated at {TTFT_TARGET_HISTORY} tokens, not measured here"
    )
    return "\n\n".join(
        [
            f"Time to first token, {args.new_tokens} new tokens after the history (median "
            f"of {args.repeats}; {target_note}):\n{ttft}",
            f"Decode tokens/s over {args.decode_tokens} steps (median of {args.repeats}; "
            f"median step in ms):\n{decode}",
            "Remote residency, one decode step at the middle position (overhead = remote - "
            "plain step; wire = raw TCP loopback time of the step's bytes; prefetch, "
            f"convert, append: the service's parts alone):\n{step}",
        ]
    )


def machine_info(args: argparse.Namespace, lm: LoadedModel | None) -> dict[str, Any]:
    import grpc
    import numpy as np
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "model": args.model,
        "model_dtype": str(lm.model.dtype).removeprefix("torch.") if lm is not None else None,
        "model_shape": (
            {"num_layers": lm.num_layers, "kv_heads": lm.kv_heads, "head_dim": lm.head_dim}
            if lm is not None
            else None
        ),
    }


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    """Run the benchmark; `lm`: a model already loaded (tests), else `--model` loads."""
    args = parse_args(argv)
    began = time.perf_counter()
    load_before = load_average()
    # The loopback receiver first: its spawned process imports this file's light top.
    tcp = TcpBaseline()
    workdir = tempfile.TemporaryDirectory(prefix="minicache-bench-")
    server = client = bench = None
    results: list[dict[str, Any]] = []
    warmup: dict[str, Any] = {}
    try:
        import torch

        from minicache_client import CacheClient, ClientConfig
        from minicache_server.settings import ServerSettings
        from minicache_worker.generation import TORCH_KV_DTYPES, TurnGenerator
        from minicache_worker.models import load_model

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        loaded = time.perf_counter()
        if lm is None:
            progress(f"loading {args.model} ...")
            lm = load_model(args.model)
        else:
            args.model = lm.name
        load_s = time.perf_counter() - loaded
        model_dtype = TORCH_KV_DTYPES[lm.model.dtype]
        kv_dtype = args.kv_dtype or model_dtype
        context = lm.model.config.get_text_config(decoder=True).max_position_embeddings
        needed = max(args.history_tokens) + args.new_tokens + args.decode_tokens + 1
        if context and needed > context:
            raise BenchmarkError(
                f"{needed} tokens (history + new + decode) exceed the model's {context}"
            )
        text_tokens = texts_tokens(lm, max(args.history_tokens) + args.new_tokens)
        settings = ServerSettings(
            listen="127.0.0.1:0",
            metrics_listen="",
            insecure=True,
            log_format="text",
            log_level="WARNING",
            device="cpu",
            device_budget_bytes=int(args.device_budget_gib * 2**30),
        )
        if args.server == "thread":
            server = ServerThread(settings)
        else:
            server = ServerProcess(settings.device_budget_bytes, workdir.name)
        client = CacheClient(
            ClientConfig(target=server.address, insecure=True, timeout_s=args.timeout_s)
        )
        bench = Bench(
            args=args,
            lm=lm,
            client=client,
            plain=TurnGenerator(lm, None),
            service=TurnGenerator(lm, client, kv_dtype=kv_dtype),
            tcp=tcp,
            text_tokens=text_tokens,
            kv_dtype=kv_dtype,
            model_dtype=model_dtype,
            bytes_per_token=2 * lm.num_layers * lm.kv_heads * lm.head_dim * ITEMSIZE[kv_dtype],
        )
        print(
            f"model {args.model} ({model_dtype}; {lm.num_layers} layers, {lm.kv_heads} KV heads "
            f"of {lm.head_dim}), loaded in {load_s:.1f} s; KV dtype {kv_dtype} "
            f"({bench.bytes_per_token:,} wire bytes per token), policy {args.policy_name}; "
            f"{args.new_tokens} new tokens, {args.decode_tokens} decode steps, "
            f"{args.repeats} repeats; {SERVER_MODES[args.server]}; "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads; load average {load_before}",
            flush=True,
        )

        # Warm-up on a short history; it also checks that the decode modes agree.
        warm_len = min(WARMUP_HISTORY, max(1, min(args.history_tokens) // 4))
        progress(f"warm-up ({warm_len}-token history) ...")
        warmup = measure_history(bench, warm_len, warmup=True)
        if warmup["tokens_identical"]:
            print(
                f"check: plain, service local and service remote generated the same "
                f"{len(warmup['generated_tokens']['plain'])} tokens after a {warm_len}-token "
                "history",
                flush=True,
            )
        for history_len in args.history_tokens:
            progress(f"history {history_len} tokens ...")
            results.append(measure_history(bench, history_len))
    except BenchmarkError as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        if isinstance(server, ServerProcess):
            print(f"cache server log (tail):\n{server.log_tail()}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        tcp.close()
        workdir.cleanup()

    print()
    print(format_report(args, results))
    wall = time.perf_counter() - began
    load_after = load_average()
    for message in bench.warnings:
        print(f"WARNING: {message}")
    print(f"\nload average before {load_before}, after {load_after}; wall time {wall:.1f} s")
    if args.json:
        document = {
            "benchmark": "worker_latency",
            "units": "seconds; tokens per second; bytes; GB/s = 1e9 bytes per second",
            "machine": machine_info(args, bench.lm),
            "config": {
                "model": args.model,
                "model_dtype": bench.model_dtype,
                "kv_dtype": bench.kv_dtype,
                "wire_bytes_per_token": bench.bytes_per_token,
                "policy": args.policy_name,
                "history_tokens": args.history_tokens,
                "new_tokens": args.new_tokens,
                "decode_tokens": args.decode_tokens,
                "repeats": args.repeats,
                "quick": args.quick,
                "skip_miss": args.skip_miss,
                "min_run_seconds": args.min_run_ms / 1000,
                "server": SERVER_MODES[args.server],
                "device_budget_bytes": int(args.device_budget_gib * 2**30),
                "text": "evaluation split of the bundled Paul Graham essays, from its start",
            },
            "targets": {
                "ttft_recompute_over_resumed_at_least": TTFT_TARGET,
                "ttft_target_history_tokens": TTFT_TARGET_HISTORY,
                "remote_overhead_over_wire_at_most": OVERHEAD_TARGET,
            },
            "warmup": warmup,
            "results": results,
            "verdicts": [
                {
                    "history_tokens": r["history_tokens"],
                    "ttft_pass": ttft_verdict(r),
                    "remote_overhead_pass": overhead_verdict(r),
                }
                for r in results
            ],
            "warnings": bench.warnings,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "wall_seconds": wall,
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
