"""Put and prefetch throughput of the MiniCache service against raw TCP and redis-py.

For each sequence size (`--sizes-mib`, default 1, 4, 16 and 64 MiB of fp16 KV) it
measures, in one run on the same bytes:

- raw TCP loopback (the baseline): a receiver process on 127.0.0.1 reads exactly N
  bytes with `recv_into` into a buffer allocated once and answers one byte; the client
  `sendall`s the N bytes on a connection opened once and waits for that byte. One
  direction only: on loopback both directions take the same path.
- redis-py SET and GET of the same N bytes as one value, against a `redis-server`
  process started here without persistence (`--save "" --appendonly no`), on one
  connection opened once (redis caps a value at 512 MiB: `proto-max-bulk-len`).
- MiniCache, a `minicache-server` process (so client and server do not share a GIL),
  through the SDK's `CacheClient`:
  - `put none`: `put(..., policy="none", seal=True)` of every layer (stored as is);
  - `prefetch none restored`: `prefetch(..., wire_form="restored")` of every layer;
  - for every compressing policy P (`--policies`, default `default` and `kivi4`):
    `put P`; `prefetch P compressed`: the stored entries on the wire, checked and
    restored to float16 in the client (`wire_form="compressed"`), timed until the last
    layer is restored; `prefetch P restored`: the server restores, float16 on the wire.

Every figure is in GB/s (1e9 bytes per second) of fp16-equivalent KV: 2 x layers x
kv_heads x tokens x head_dim x 2 bytes, divided by the wall time (`time.perf_counter`),
whatever crosses the wire. The raw TCP and redis rows move exactly those bytes (the
KV's keys and values, layer after layer). A prefetch is timed until the SDK's iterator
has yielded every layer; a put until the server's answer arrived. Before each put the
sequence is deleted (not timed), so that every put is a fresh write. Each measurement
runs once as a warm-up, then `--repeats` timed runs; a run of an operation faster than
`--min-run-ms` (default 50 ms: raw TCP and redis, small sizes) repeats it back to back
until that long and counts the mean, so sub-millisecond transfers are not single
samples. The table shows the median run and, in parentheses, the best; ratios and
target checks use `--statistic` (default median) of both sides. After each warm-up the result is checked: exact bytes for redis GET and
policy none; shape and relative error for compressing policies, and whether the
client-side and server-side restores agree. Next to the times, the median CPU seconds
of the client process (every thread, `time.process_time`) and of the serving process
(the TCP receiver, redis-server or minicache-server; Linux /proc, 10 ms ticks) tell
which side limits a figure.

The targets (printed PASS or MISS, per size): uncompressed put and prefetch at least
50% of raw TCP loopback and at least 2x redis-py GET; with the compressed wire form,
restored KV delivered faster than raw TCP moves the uncompressed bytes.

Synthetic KV, seeded (`--seed`), `[kv_heads, tokens, head_dim]` float16 per layer:
standard normal values; standard normal keys with 4 outlier channels per head scaled
by 6 (as real keys have). Tokens per size: round(size / bytes per token), at least 1;
the bytes actually moved are reported.

Defaults: the bundled model's KV shape (SmolLM2-135M: 30 layers, 3 KV heads of 64, so
23,040 bytes per token), policies `default` and `kivi4`, 3 repeats: about a minute on 2
CPU cores.

    python deploy/benchmarks/service_throughput.py
    python deploy/benchmarks/service_throughput.py --sizes-mib 1,16 --policies paper \
        --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from arguments import positive_float, positive_int
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loopback import TcpBaseline  # beside this script

from minicache_client import CacheClient, ClientConfig, PutResult
from minicache_client.policy import PRESETS, load_policy

DTYPE = "float16"
MODEL_ID = "bench-model"
KEY_OUTLIER_CHANNELS = 4
KEY_OUTLIER_SCALE = 6.0
REDIS_MAX_VALUE = 512 * 2**20  # redis' default proto-max-bulk-len, 512mb (MiB)
START_TIMEOUT_S = 30.0


# -- results --------------------------------------------------------------------------


@dataclass
class Timing:
    """Per timed run (warm-up excluded): seconds of one operation (the mean over the
    run's operations), the CPU seconds that the client process (every thread) and the
    serving process spent per operation (None where unknown), operations in the run."""

    seconds: list[float]
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float | None] = field(default_factory=list)
    operations: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def pick(self, statistic: str) -> float:
        return self.median if statistic == "median" else self.best

    @property
    def median_client_cpu(self) -> float:
        return statistics.median(self.client_cpu)

    @property
    def median_server_cpu(self) -> float | None:
        known = [cpu for cpu in self.server_cpu if cpu is not None]
        return statistics.median(known) if known else None


@dataclass
class Row:
    method: str
    timing: Timing
    note: str = ""


@dataclass
class SizeResult:
    size_mib: float
    tokens: int
    nbytes: int
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> Row:
        return next(row for row in self.rows if row.method == method)


TCP = "raw TCP loopback"
REDIS_SET = "redis-py SET"
REDIS_GET = "redis-py GET"
PUT_NONE = "put none"
PREFETCH_NONE = "prefetch none restored"


def put_name(policy: str) -> str:
    return f"put {policy}"


def compressed_name(policy: str) -> str:
    return f"prefetch {policy} compressed"


def restored_name(policy: str) -> str:
    return f"prefetch {policy} restored"


# -- arguments ------------------------------------------------------------------------


def _sizes(text: str) -> list[float]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected sizes in MiB separated by commas, e.g. 1,4,16")
    return list(dict.fromkeys(positive_float(part) for part in parts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Put and prefetch throughput of a MiniCache server process, in GB/s of "
        "fp16-equivalent KV, next to raw TCP loopback and redis-py SET/GET of the same bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes-mib",
        type=_sizes,
        default="1,4,16,64",
        metavar="LIST",
        help="sequence sizes in MiB of fp16 KV, separated by commas",
    )
    shape = parser.add_argument_group("model shape (default: SmolLM2-135M)")
    shape.add_argument("--layers", type=positive_int, default=30, help="number of layers")
    shape.add_argument("--kv-heads", type=positive_int, default=3, help="KV heads per layer")
    shape.add_argument("--head-dim", type=positive_int, default=64, help="channels per head")
    parser.add_argument(
        "--policies",
        nargs="*",
        default=["default", "kivi4"],
        metavar="POLICY",
        help=f"compressing policies: presets ({', '.join(p for p in PRESETS if p != 'none')}) "
        "or policy JSON files; none is always measured",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed runs after one warm-up"
    )
    parser.add_argument(
        "--statistic",
        choices=["median", "best"],
        default="median",
        help="statistic of the runs used by the ratio columns and the target checks",
    )
    parser.add_argument(
        "--min-run-ms",
        type=positive_float,
        default=50.0,
        help="a timed run repeats a faster operation back to back until this many "
        "milliseconds, and counts the mean",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic KV")
    service = parser.add_argument_group("services")
    service.add_argument(
        "--server-device",
        choices=["auto", "cpu", "cuda"],
        default="cpu",
        help="MINICACHE_DEVICE of the cache server",
    )
    service.add_argument(
        "--device-budget-gib",
        type=positive_float,
        default=4.0,
        help="MINICACHE_DEVICE_BUDGET_BYTES of the cache server, in GiB",
    )
    service.add_argument(
        "--timeout-s", type=positive_float, default=120.0, help="deadline of every SDK call"
    )
    service.add_argument(
        "--redis-server",
        default=shutil.which("redis-server") or "redis-server",
        help="the redis-server binary (Debian package redis-server)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    return parser


def bytes_per_token(args: argparse.Namespace) -> int:
    return 2 * args.layers * args.kv_heads * args.head_dim * 2


def tokens_for(size_mib: float, args: argparse.Namespace) -> int:
    return max(1, round(size_mib * 2**20 / bytes_per_token(args)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if shutil.which(args.redis_server) is None:
        parser.error(
            f"--redis-server {args.redis_server}: not found (apt-get install redis-server)"
        )
    server = Path(sys.executable).with_name("minicache-server")
    if not server.is_file():
        parser.error(f"{server} not found: install cache_server into this interpreter's venv")
    args.server_binary = str(server)
    for size in args.sizes_mib:
        nbytes = tokens_for(size, args) * bytes_per_token(args)
        if nbytes > REDIS_MAX_VALUE:
            parser.error(f"--sizes-mib {size:g}: above redis' 512 MiB limit on one value")
        if 2 * nbytes > args.device_budget_gib * 2**30:
            parser.error(
                f"--sizes-mib {size:g}: --device-budget-gib {args.device_budget_gib:g} must "
                "hold twice the sequence"
            )
    # Presets travel by name, policy files as their JSON; none is measured anyway.
    args.policy_args, args.policy_names = [], []
    for name in dict.fromkeys(args.policies):
        try:
            policy = load_policy(name)
        except ValueError as exc:
            parser.error(f"--policies {name}: {exc}")
        if policy.name != "none":
            label = name if name in PRESETS else policy.name
            if label in args.policy_names:  # two files with one policy name
                label = f"{label}:{name}"
            args.policy_args.append(name if name in PRESETS else policy.to_json())
            args.policy_names.append(label)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: folder {folder} does not exist")
    return args


# -- data -----------------------------------------------------------------------------


def synthetic_kv(
    num_layers: int, kv_heads: int, tokens: int, head_dim: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-layer float16 (keys, values), `[kv_heads, tokens, head_dim]` each."""
    rng = np.random.default_rng(seed)
    dims = (kv_heads, tokens, head_dim)
    outliers = min(KEY_OUTLIER_CHANNELS, head_dim)
    layers = []
    for _ in range(num_layers):
        keys = rng.standard_normal(dims, dtype=np.float32)
        for head in range(kv_heads):
            channels = rng.choice(head_dim, size=outliers, replace=False)
            keys[head][:, channels] *= KEY_OUTLIER_SCALE
        values = rng.standard_normal(dims, dtype=np.float32)
        layers.append((keys.astype(np.float16), values.astype(np.float16)))
    return layers


def kv_bytes(layers: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The KV's raw bytes, keys then values, layer after layer."""
    return b"".join(part.tobytes() for pair in layers for part in pair)


# -- services -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def start_redis(binary: str, workdir: str) -> tuple[subprocess.Popen, redis.Redis]:
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        db=0,
        protocol=2,
        socket_timeout=60.0,
        socket_connect_timeout=5.0,
        socket_keepalive=False,
        decode_responses=False,
        health_check_interval=0,
        single_connection_client=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.ping()
            return process, client
        except redis.RedisError:
            if process.poll() is not None or time.monotonic() > deadline:
                _stop(process)
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


def start_cache_server(
    args: argparse.Namespace, log_path: str
) -> tuple[subprocess.Popen, str, Any]:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
    env.update(
        {
            "MINICACHE_INSECURE": "1",
            "MINICACHE_LISTEN": address,
            "MINICACHE_METRICS_LISTEN": "",
            "MINICACHE_DEVICE": args.server_device,
            "MINICACHE_DEVICE_BUDGET_BYTES": str(int(args.device_budget_gib * 2**30)),
            "MINICACHE_LOG_LEVEL": "WARNING",
            "MINICACHE_LOG_FORMAT": "text",
        }
    )
    log = open(log_path, "wb")  # noqa: SIM115 -- closed by the caller
    process = subprocess.Popen([args.server_binary], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                log.close()
                raise RuntimeError(
                    f"minicache-server exited with {process.returncode}: "
                    + Path(log_path).read_text(errors="replace")[-2000:]
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process, address, log
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                _stop(process)
                log.close()
                raise RuntimeError(f"minicache-server did not become SERVING on {address}")
            time.sleep(0.1)


# -- timing ---------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, every thread (Linux /proc; clock ticks,
    usually 10 ms); None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def timed(
    operation: Callable[[], Any],
    repeats: int,
    min_run_s: float,
    *,
    server_pid: int,
    setup: Callable[[], Any] | None = None,
    check: Callable[[Any], Any] | None = None,
) -> tuple[Timing, Any]:
    """One warm-up operation, then `repeats` timed runs. A run repeats the operation
    until the operations have taken `min_run_s` (a single operation when it takes that
    long) and counts their mean. `setup` runs before every operation, outside the
    timing. `check` gets the warm-up's result; its answer comes back with the timing.
    `server_pid`: the process serving the operation, whose CPU time is counted too."""
    if setup:
        setup()
    result = operation()
    checked = check(result) if check else None
    timing = Timing([])
    for _ in range(repeats):
        count = 0
        elapsed = client_cpu = 0.0
        server_cpu: float | None = 0.0
        while count == 0 or elapsed < min_run_s:
            result = None  # free the previous result first
            if setup:
                setup()
            server_before = process_cpu_seconds(server_pid)
            client_before = time.process_time()
            start = time.perf_counter()
            result = operation()
            elapsed += time.perf_counter() - start
            client_cpu += time.process_time() - client_before
            server_after = process_cpu_seconds(server_pid)
            if server_cpu is not None and server_before is not None and server_after is not None:
                server_cpu += server_after - server_before
            else:
                server_cpu = None
            count += 1
        timing.seconds.append(elapsed / count)
        timing.client_cpu.append(client_cpu / count)
        timing.server_cpu.append(None if server_cpu is None else server_cpu / count)
        timing.operations.append(count)
    return timing, checked


def prefetch_all(client: CacheClient, sequence_id: str, wire_form: str) -> list:
    return [
        (keys, values)
        for _, keys, values in client.prefetch(MODEL_ID, sequence_id, wire_form=wire_form)
    ]


def relative_error(layers: list, restored: list) -> float:
    """||restored - original|| / ||original|| over the whole cache, in float64."""
    error = norm = 0.0
    for pair, back in zip(layers, restored, strict=True):
        for original, got in zip(pair, back, strict=True):
            if got.shape != original.shape or got.dtype != original.dtype:
                raise RuntimeError(
                    f"restored {got.shape} {got.dtype}, expected {original.shape} {original.dtype}"
                )
            reference = original.astype(np.float64)
            error += float(np.sum((got.astype(np.float64) - reference) ** 2))
            norm += float(np.sum(reference**2))
    return (error / norm) ** 0.5


def same_layers(a: list, b: list) -> bool:
    return all(
        np.array_equal(x, y)
        for pair_a, pair_b in zip(a, b, strict=True)
        for x, y in zip(pair_a, pair_b, strict=True)
    )


@dataclass
class Services:
    """What one run measures against: the processes and the client-side handles."""

    tcp: TcpBaseline
    redis_process: subprocess.Popen
    store: redis.Redis
    server: subprocess.Popen
    client: CacheClient


def benchmark_size(size_mib: float, args: argparse.Namespace, services: Services) -> SizeResult:
    tokens = tokens_for(size_mib, args)
    layers = synthetic_kv(args.layers, args.kv_heads, tokens, args.head_dim, args.seed)
    payload = kv_bytes(layers)
    result = SizeResult(size_mib, tokens, len(payload))
    repeats, min_run_s = args.repeats, args.min_run_ms / 1000
    tcp, store, client = services.tcp, services.store, services.client
    tcp_pid, redis_pid = services.tcp.process.pid, services.redis_process.pid
    server_pid = services.server.pid

    def progress(what: str, began: float) -> None:
        print(
            f"  {size_mib:g} MiB: {what} in {time.perf_counter() - began:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    began = time.perf_counter()
    timing, _ = timed(lambda: tcp.transfer(payload), repeats, min_run_s, server_pid=tcp_pid)
    result.rows.append(Row(TCP, timing, "one way, into a preallocated buffer"))
    progress(TCP, began)

    began = time.perf_counter()
    key = f"bench:{size_mib:g}"
    timing, _ = timed(lambda: store.set(key, payload), repeats, min_run_s, server_pid=redis_pid)
    result.rows.append(Row(REDIS_SET, timing, "one value"))

    def check_get(value: bytes | None) -> None:
        if value != payload:
            raise RuntimeError("redis GET returned other bytes than SET stored")

    timing, _ = timed(
        lambda: store.get(key), repeats, min_run_s, server_pid=redis_pid, check=check_get
    )
    result.rows.append(Row(REDIS_GET, timing, "one value, exact"))
    store.delete(key)
    progress("redis-py SET/GET", began)

    def put(sequence_id: str, policy: str) -> tuple[Timing, PutResult]:
        # Each put a fresh write: the sequence is deleted first, outside the timing.
        return timed(
            lambda: client.put(
                MODEL_ID, sequence_id, layers, dtype=DTYPE, policy=policy, seal=True
            ),
            repeats,
            min_run_s,
            server_pid=server_pid,
            setup=lambda: client.delete(MODEL_ID, sequence_id),
            check=lambda answer: answer,
        )

    def prefetch(
        sequence_id: str, wire_form: str, check: Callable[[list], Any]
    ) -> tuple[Timing, Any]:
        return timed(
            lambda: prefetch_all(client, sequence_id, wire_form),
            repeats,
            min_run_s,
            server_pid=server_pid,
            check=check,
        )

    # Uncompressed: stored as is, restored exactly.
    began = time.perf_counter()
    sequence = f"none-{size_mib:g}"
    timing, answer = put(sequence, "none")
    if answer.fp16_bytes != len(payload) or answer.tokens != tokens:
        raise RuntimeError(f"put none: the server answered {answer}, expected {len(payload)} B")
    result.rows.append(Row(PUT_NONE, timing, f"stored {answer.stored_bytes:,} B"))

    def check_exact(restored: list) -> None:
        if not same_layers(layers, restored):
            raise RuntimeError("prefetch of policy none returned other KV than put")

    timing, _ = prefetch(sequence, "restored", check_exact)
    result.rows.append(Row(PREFETCH_NONE, timing, "exact"))
    client.delete(MODEL_ID, sequence)
    progress("policy none", began)

    for policy, name in zip(args.policy_args, args.policy_names, strict=True):
        began = time.perf_counter()
        sequence = f"{name}-{size_mib:g}"
        timing, answer = put(sequence, policy)
        ratio = answer.compression_ratio
        result.rows.append(
            Row(put_name(name), timing, f"stored {answer.stored_bytes:,} B, ratio {ratio:.2f}x")
        )
        client_restored: list = []

        def check_compressed(restored: list, keep: list = client_restored) -> float:
            keep.extend(restored)
            return relative_error(layers, restored)

        timing, error = prefetch(sequence, "compressed", check_compressed)
        result.rows.append(
            Row(compressed_name(name), timing, f"client restores; rel. error {error:.3f}")
        )

        def check_restored(restored: list, reference: list = client_restored) -> bool:
            return same_layers(reference, restored)

        timing, identical = prefetch(sequence, "restored", check_restored)
        agreement = "same as client's" if identical else "DIFFERS from client's"
        result.rows.append(Row(restored_name(name), timing, f"server restores; {agreement}"))
        result.details[name] = {
            "stored_bytes": answer.stored_bytes,
            "compression_ratio": ratio,
            "relative_error": error,
            "client_and_server_restore_identical": identical,
        }
        client_restored.clear()
        client.delete(MODEL_ID, sequence)
        progress(f"policy {name}", began)
    return result


# -- report ---------------------------------------------------------------------------


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i in (0, len(header) - 1) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_size(result: SizeResult, statistic: str) -> str:
    nbytes = result.nbytes
    tcp = gbps(nbytes, result.row(TCP).timing.pick(statistic))
    get = gbps(nbytes, result.row(REDIS_GET).timing.pick(statistic))
    rows = []
    for row in result.rows:
        rate = gbps(nbytes, row.timing.pick(statistic))
        server_cpu = row.timing.median_server_cpu
        rows.append(
            (
                row.method,
                f"{row.timing.median:.4f}",
                f"{gbps(nbytes, row.timing.median):.3f} ({gbps(nbytes, row.timing.best):.3f})",
                f"{rate / tcp:.3f}",
                f"{rate / get:.3f}",
                f"{row.timing.median_client_cpu:.3f}",
                "-" if server_cpu is None else f"{server_cpu:.3f}",
                row.note,
            )
        )
    header = (
        "method",
        "median s",
        "GB/s (best)",
        "/raw TCP",
        "/redis GET",
        "client CPU s",
        "server CPU s",
        "note",
    )
    title = (
        f"{result.size_mib:g} MiB: {result.tokens} tokens, {nbytes:,} bytes of fp16 KV "
        f"({nbytes / 2**20:.2f} MiB)"
    )
    return title + "\n" + _table(header, rows)


@dataclass(frozen=True)
class Check:
    target: str
    method: str
    baseline: str
    needed: float  # ratio to the baseline
    strict: bool = False  # > instead of >=

    def ratio(self, result: SizeResult, statistic: str) -> float:
        return result.row(self.baseline).timing.pick(statistic) / result.row(
            self.method
        ).timing.pick(statistic)

    def passes(self, ratio: float) -> bool:
        return ratio > self.needed if self.strict else ratio >= self.needed


def target_checks(policy_names: list[str]) -> list[Check]:
    checks = [
        Check("uncompressed >= 50% of raw TCP", PUT_NONE, TCP, 0.5),
        Check("uncompressed >= 50% of raw TCP", PREFETCH_NONE, TCP, 0.5),
        Check("uncompressed >= 2x redis-py GET", PUT_NONE, REDIS_GET, 2.0),
        Check("uncompressed >= 2x redis-py GET", PREFETCH_NONE, REDIS_GET, 2.0),
    ]
    for name in policy_names:
        checks.append(
            Check("compressed wire > raw TCP", compressed_name(name), TCP, 1.0, strict=True)
        )
    return checks


def format_checks(results: list[SizeResult], checks: list[Check], statistic: str) -> str:
    header = ("target", "method", *(f"{r.size_mib:g} MiB" for r in results), "all")
    rows = []
    for check in checks:
        cells = []
        verdicts = []
        for result in results:
            ratio = check.ratio(result, statistic)
            verdicts.append(check.passes(ratio))
            cells.append(f"{ratio:.2f}x {'PASS' if verdicts[-1] else 'MISS'}")
        rows.append((check.target, check.method, *cells, "PASS" if all(verdicts) else "MISS"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return (
        f"targets ({statistic} GB/s of the method / the baseline named in the target):\n"
        + "\n".join(lines)
    )


def redis_server_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        HIREDIS_AVAILABLE = None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "redis_py_hiredis": HIREDIS_AVAILABLE,
        "redis_server": redis_server_version(args.redis_server),
    }


def report_json(
    args: argparse.Namespace,
    results: list[SizeResult],
    checks: list[Check],
    wall_seconds: float,
) -> dict[str, Any]:
    statistic = args.statistic
    sizes = []
    for result in results:
        nbytes = result.nbytes
        tcp = gbps(nbytes, result.row(TCP).timing.pick(statistic))
        get = gbps(nbytes, result.row(REDIS_GET).timing.pick(statistic))
        methods = {}
        for row in result.rows:
            rate = gbps(nbytes, row.timing.pick(statistic))
            methods[row.method] = {
                "seconds": row.timing.seconds,
                "median_seconds": row.timing.median,
                "min_seconds": row.timing.best,
                "median_gbps": gbps(nbytes, row.timing.median),
                "best_gbps": gbps(nbytes, row.timing.best),
                "operations_per_run": row.timing.operations,
                "client_cpu_seconds": row.timing.client_cpu,
                "server_cpu_seconds": row.timing.server_cpu,
                "over_raw_tcp": rate / tcp,
                "over_redis_get": rate / get,
                "note": row.note,
            }
        sizes.append(
            {
                "size_mib": result.size_mib,
                "tokens": result.tokens,
                "fp16_bytes": nbytes,
                "methods": methods,
                "policies": result.details,
                "checks": [
                    {
                        "target": check.target,
                        "method": check.method,
                        "baseline": check.baseline,
                        "needed_ratio": check.needed,
                        "strict": check.strict,
                        "ratio": check.ratio(result, statistic),
                        "pass": check.passes(check.ratio(result, statistic)),
                    }
                    for check in checks
                ],
            }
        )
    return {
        "benchmark": "service_throughput",
        "units": "GB/s = 1e9 bytes of fp16-equivalent KV per second",
        "machine": machine_info(args),
        "config": {
            "num_layers": args.layers,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": DTYPE,
            "bytes_per_token": bytes_per_token(args),
            "sizes_mib": args.sizes_mib,
            "policies": args.policy_names,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "min_run_seconds": args.min_run_ms / 1000,
            "statistic": statistic,
            "seed": args.seed,
            "server_device": args.server_device,
            "device_budget_bytes": int(args.device_budget_gib * 2**30),
            "timeout_s": args.timeout_s,
            "data": "synthetic: standard normal float16; keys with 4 outlier channels per "
            "head scaled by 6",
        },
        "sizes": sizes,
        "all_pass": all(
            size["checks"] and all(c["pass"] for c in size["checks"]) for size in sizes
        ),
        "wall_seconds": wall_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    print(
        f"KV: {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} dims, {DTYPE} "
        f"({bytes_per_token(args):,} bytes per token), synthetic normal values (keys with "
        f"outlier channels); GB/s of fp16 KV, median (best) of {args.repeats} runs of at "
        f"least {args.min_run_ms:g} ms after 1 warm-up; ratios of {args.statistic}s. Client, cache server, redis-server and TCP "
        f"receiver are separate processes on 127.0.0.1; {os.cpu_count()} CPUs.",
        flush=True,
    )
    tcp = None
    server = redis_process = None
    store = client = log = None
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="minicache-bench-") as workdir:
        try:
            tcp = TcpBaseline()
            redis_process, store = start_redis(args.redis_server, workdir)
            server, address, log = start_cache_server(args, os.path.join(workdir, "server.log"))
            client = CacheClient(
                ClientConfig(target=address, insecure=True, timeout_s=args.timeout_s)
            )
            services = Services(tcp, redis_process, store, server, client)
            for size in args.sizes_mib:
                results.append(benchmark_size(size, args, services))
                print()
                print(format_size(results[-1], args.statistic), flush=True)
        except BaseException:
            if log is not None:
                log.flush()
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                if tail.strip():
                    print(f"cache server log (tail):\n{tail}", file=sys.stderr)
            raise
        finally:
            if client is not None:
                client.close()
            if store is not None:
                store.close()
            _stop(server)
            _stop(redis_process)
            if log is not None:
                log.close()
            if tcp is not None:
                tcp.close()
    checks = target_checks(args.policy_names)
    print()
    print(format_checks(results, checks, args.statistic))
    wall = time.perf_counter() - began
    print(f"wall time {wall:.1f} s")
    if args.json:
        document = report_json(args, results, checks, wall)
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
