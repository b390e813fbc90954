"""Latency of a one-token Append and of Lookup against the history a sequence holds.

A decode step extends every layer of a sequence by one token (`CacheClient.append`);
its cost should not grow with the tokens already held, or a session's total cost is
quadratic. For each policy and each history length this puts a sequence of that many
tokens (synthetic KV in SmolLM2's shape unless told otherwise), then times `--steps`
one-token Appends in a row and as many Lookups, each a blocking call from this
process to a `minicache-server` process on loopback. The baseline, in the same run: a
`grpc.health.v1` Check through the same client (`CacheClient.health`), a unary call that
does no work: the floor of any call here.

Reported per row: p50 and p95 in ms; per policy, Append p50 at the longest history over
the shortest (the target is <= 1.2) and Lookup/Append p50 against 2 ms.

    python deploy/benchmarks/append_latency.py
    python deploy/benchmarks/append_latency.py --policies none kivi4 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from arguments import positive_float, positive_int, write_report  # beside this script
from service_throughput import _stop, start_cache_server, synthetic_kv

from minicache_client import CacheClient, ClientConfig
from minicache_client.policy import PRESETS

MODEL = "bench-append"
TARGET_MS = 2.0
TARGET_GROWTH = 1.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One-token Append and Lookup latency of a MiniCache server process "
        "against the history held, next to a no-op health check of the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--histories",
        type=positive_int,
        nargs="+",
        default=[1024, 2048, 4096, 8192],
        metavar="TOKENS",
        help="tokens held before the appends",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["none", "kivi4", "default"],
        choices=sorted(PRESETS),
        metavar="POLICY",
        help="presets to measure",
    )
    parser.add_argument("--steps", type=positive_int, default=50, help="timed calls per row")
    shape = parser.add_argument_group("model shape (default: SmolLM2-135M)")
    shape.add_argument("--layers", type=positive_int, default=30, help="number of layers")
    shape.add_argument("--kv-heads", type=positive_int, default=3, help="KV heads per layer")
    shape.add_argument("--head-dim", type=positive_int, default=64, help="channels per head")
    parser.add_argument(
        "--device-budget-gib", type=positive_float, default=4.0, help="the server's device tier"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic KV")
    parser.add_argument("--json", metavar="PATH", help="write every timing as JSON here")
    return parser


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1e3 * statistics.median(ordered),
        "p95_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def timed(call: Callable[[int], object], steps: int) -> list[float]:
    """Seconds of each of `steps` calls (`call(i)`), after one untimed warm-up."""
    call(-1)
    seconds = []
    for step in range(steps):
        began = time.perf_counter()
        call(step)
        seconds.append(time.perf_counter() - began)
    return seconds


def measure_history(client: CacheClient, policy: str, history: int, args) -> dict:
    """Put `history` tokens, then time one-token Appends and Lookups of that sequence."""
    layers = synthetic_kv(args.layers, args.kv_heads, history, args.head_dim, args.seed)
    sequence = f"{policy}-{history}"
    client.put(MODEL, sequence, layers, dtype="float16", policy=policy)
    step_kv = synthetic_kv(args.layers, args.kv_heads, 1, args.head_dim, args.seed + 1)
    held = [history]

    def append(_: int) -> None:
        client.append(MODEL, sequence, step_kv, dtype="float16", start_token=held[0])
        held[0] += 1

    appends = timed(append, args.steps)
    lookups = timed(lambda _: client.lookup(MODEL, sequence), args.steps)
    client.delete(MODEL, sequence)
    row = {
        "history": history,
        "append": percentiles(appends) | {"seconds": appends},
        "lookup": percentiles(lookups) | {"seconds": lookups},
    }
    print(
        f"  {policy:<8} {history:>6} tokens: append p50 {row['append']['p50_ms']:.2f} ms, "
        f"lookup p50 {row['lookup']['p50_ms']:.2f} ms",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = Path(sys.executable).with_name("minicache-server")
    if not server.is_file():
        print(f"{server} not found: install cache_server into this venv", file=sys.stderr)
        return 2
    args.server_binary = str(server)
    args.server_device = "cpu"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        process, address, log = start_cache_server(args, str(Path(workdir) / "server.log"))
        try:
            client = CacheClient(ClientConfig(target=address, insecure=True))
            checks = timed(lambda _: client.health(), args.steps)
            baseline = percentiles(checks) | {"seconds": checks}
            print(f"  health check (baseline) p50 {baseline['p50_ms']:.2f} ms", flush=True)
            results = {
                policy: [measure_history(client, policy, h, args) for h in args.histories]
                for policy in args.policies
            }
            client.close()
        finally:
            _stop(process)
            log.close()
    print()
    print(f"{'policy':<9}{'history':>8}{'append p50':>12}{'p95':>8}{'lookup p50':>12}{'p95':>8}")
    for policy, rows in results.items():
        for row in rows:
            print(
                f"{policy:<9}{row['history']:>8}{row['append']['p50_ms']:>12.2f}"
                f"{row['append']['p95_ms']:>8.2f}{row['lookup']['p50_ms']:>12.2f}"
                f"{row['lookup']['p95_ms']:>8.2f}"
            )
    print(f"health check (baseline): p50 {baseline['p50_ms']:.2f} ms, p95 {baseline['p95_ms']:.2f}")
    summary = {}
    for policy, rows in results.items():
        growth = rows[-1]["append"]["p50_ms"] / rows[0]["append"]["p50_ms"]
        summary[policy] = {
            "append_growth": growth,
            "append_p50_max_ms": max(row["append"]["p50_ms"] for row in rows),
            "lookup_p50_max_ms": max(row["lookup"]["p50_ms"] for row in rows),
        }
        print(
            f"{policy}: append p50 at {rows[-1]['history']} / at {rows[0]['history']} tokens "
            f"{growth:.2f} (target <= {TARGET_GROWTH}); largest append p50 "
            f"{summary[policy]['append_p50_max_ms']:.2f} ms, lookup p50 "
            f"{summary[policy]['lookup_p50_max_ms']:.2f} ms (target <= {TARGET_MS} ms)"
        )
    del args.server_binary  # a path on this machine, not a setting of the run
    write_report(
        args,
        "append_latency",
        started,
        baseline={"health_check": baseline},
        policies=results,
        summary=summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
