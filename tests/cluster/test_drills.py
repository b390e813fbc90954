"""Fault drills on a real local cluster (tests/cluster/conftest.py): a cache server
killed while sessions run, Redis killed and restarted, a cache server stopped with a
stream in flight, a worker killed in the middle of a turn (in its prefill, in its
decode). Traffic flows through the
workers with the default policy; decoding is greedy, so every turn has one right
answer, known before the fault:

- a turn that resumes from the cache service must give the tokens of the same turn
  resumed in a healthy cluster (`references.resumed`, a session of its own run first);
- a turn that recomputes its history must give the tokens of full-cache generation
  (`references.full`: a fresh session sent the same history, which the worker
  recomputes, since the service has never seen it).

Every session here says the same messages, so one set of references serves them all.
Waits are bounded; nothing depends on timing except where a drill states its margin.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from drill_cluster import GRACE_S, MAX_NEW_TOKENS, DrillCluster, Turn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minicache_client import CacheError, NotFoundError, UnavailableError

pytestmark = [pytest.mark.model, pytest.mark.redis]

MESSAGES = ["Name a fruit.", "Name a color.", "Name an animal."]
# A message long enough that its prefill takes about a second on one busy core (the
# window in which the worker drill kills a worker mid-turn).
LONG_MESSAGE = (
    " ".join(
        f"Point {i}: the river town keeps its old stone bridge, its market and its mill."
        for i in range(20)
    )
    + " Which of these points mention the bridge?"
)
# A message whose answer runs long: the worker drill kills a worker while it decodes.
LONG_ANSWER_MESSAGE = "Describe the history of Paris in a few sentences."
LONG_ANSWER_TOKENS = 64
RECOMPUTED = ("miss", "unavailable")
BOUND_S = 30.0  # every wait for a state that a fault brings about


@dataclass
class References:
    resumed: list[Turn]  # turn k of a session resumed from the cache at every turn
    full: list[Turn]  # turn k with its history recomputed (full-cache generation)


@pytest.fixture(scope="module")
def references(drill_cluster: DrillCluster) -> References:
    resumed = drill_cluster.conversation(0, "reference-resumed", MESSAGES)
    for turn in resumed[1:]:
        assert turn.recompute_reason == "" and turn.cached_tokens > 0
    full = [resumed[0]]
    for k in range(1, len(MESSAGES)):
        turn = drill_cluster.turn(1, f"reference-full-{k}", resumed[k - 1].history, MESSAGES[k])
        assert turn.recompute_reason == "miss" and turn.cached_tokens == 0
        full.append(turn)
    return References(resumed, full)


def assert_resumed(turn: Turn, k: int, references: References, history: list[int]) -> None:
    """Turn k restored the whole history (every token but the last, which runs through
    the model) and answered as the healthy cluster did."""
    assert turn.recompute_reason == ""
    assert turn.cached_tokens == len(history) - 1
    assert turn.tokens == references.resumed[k].tokens


def assert_recomputed(turn: Turn, k: int, references: References) -> None:
    assert turn.recompute_reason in RECOMPUTED and turn.cached_tokens == 0
    assert turn.tokens == references.full[k].tokens


def wait_for(condition, what: str, timeout_s: float = BOUND_S, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(interval_s)


def turn_on_a_thread(
    dc: DrillCluster, worker: int, session: str, history: list[int], message: str, tokens: int
) -> tuple[threading.Thread, list[object], list[BaseException]]:
    """A turn streamed on a thread, started: (the thread, the events received so far,
    the CacheError that ended the stream, if one did)."""
    received: list[object] = []
    failures: list[BaseException] = []

    def stream() -> None:
        try:
            with dc.worker(worker) as client:
                for event in client.generate(
                    session, history_tokens=history, user_message=message, max_new_tokens=tokens
                ):
                    received.append(event)
        except CacheError as exc:
            failures.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    return thread, received, failures


def plaintext_health(address: str) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
    except grpc.RpcError:
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_cache_server_killed_while_sessions_run(
    drill_cluster: DrillCluster, references: References
) -> None:
    dc, victim = drill_cluster, "cache-server-1"
    old, hot = dc.sessions_on(victim, "d1-victim", 2)
    alive = [
        dc.sessions_on(server, "d1-alive", 1)[0] for server in ("cache-server-0", "cache-server-2")
    ]
    # Two turns each. The victim's older session is pushed below its device (to Redis)
    # by a sequence as large as the budget; its newer one stays on the device.
    turns = {old: dc.conversation(0, old, MESSAGES[:2])}
    dc.fill_device(victim, "d1-filler")
    for session in (hot, *alive):
        turns[session] = dc.conversation(1, session, MESSAGES[:2])
    assert dc.lookup(old).device_bytes == 0 and dc.lookup(old).overflow_bytes > 0
    assert dc.lookup(hot).device_bytes > 0

    # The victim dies (SIGKILL) while the hot session's third turn streams.
    history = turns[hot][-1].history
    with dc.worker(0) as client:
        stream = client.generate(
            hot, history_tokens=history, user_message=MESSAGES[2], max_new_tokens=MAX_NEW_TOKENS
        )
        next(stream)  # the history was restored: the first token is out
        dc.cluster.kill(victim)
        *_, result = stream
    assert_resumed(Turn.of(result, history), 2, references, history)

    # The other servers' sessions resume; the victim's recompute, with the right tokens.
    for session in alive:
        history = turns[session][-1].history
        assert_resumed(dc.turn(0, session, history, MESSAGES[2]), 2, references, history)
    assert_recomputed(dc.turn(1, old, turns[old][-1].history, MESSAGES[2]), 2, references)

    # Restarted, the victim serves what Redis held for it and drops what lived on its
    # device only (a crash writes nothing down).
    dc.cluster.restart(victim)
    assert dc.lookup(old).tokens == len(turns[old][-1].history) - 1
    with pytest.raises(NotFoundError):
        dc.lookup(hot)
    history = turns[old][-1].history
    assert_resumed(dc.turn(0, old, history, MESSAGES[2]), 2, references, history)


def test_redis_killed_and_restarted(drill_cluster: DrillCluster, references: References) -> None:
    dc, server = drill_cluster, "cache-server-0"
    below, on_device = dc.sessions_on(server, "d2", 2)
    turns = {below: dc.conversation(0, below, MESSAGES[:2])}
    dc.fill_device(server, "d2-filler")
    turns[on_device] = dc.conversation(1, on_device, MESSAGES[:2])
    assert dc.lookup(below).device_bytes == 0
    assert dc.lookup(on_device).overflow_bytes == 0

    dc.cluster.kill("redis")
    # The device tier serves; what lived in Redis is a miss, recomputed.
    history = turns[on_device][-1].history
    assert_resumed(dc.turn(0, on_device, history, MESSAGES[2]), 2, references, history)
    assert_recomputed(dc.turn(1, below, turns[below][-1].history, MESSAGES[2]), 2, references)
    with dc.tenant_cache(server) as cache:
        assert cache.stats().overflow_available is False

    # Redis back (empty: no persistence): overflow works again within 5 s. A sequence
    # as large as the budget, then another, pushes the first into Redis; it reads back.
    dc.cluster.restart("redis")
    back = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            dc.fill_device(server, f"d2-after-{attempt}")
            dc.fill_device(server, f"d2-after-{attempt}-push")
            with dc.tenant_cache(server) as cache:
                demoted = cache.lookup(dc.model_id, f"d2-after-{attempt}")
                if demoted.overflow_bytes > 0 and cache.stats().overflow_available:
                    assert len(cache.prefetch_layers(dc.model_id, f"d2-after-{attempt}")) == 8
                    break
        except UnavailableError:
            pass
        assert time.monotonic() - back < 5.0, "overflow did not resume within 5 s"
    assert time.monotonic() - back < 5.0, "overflow did not resume within 5 s"
    # The session whose KV Redis lost is a miss, recomputed, never wrong.
    assert_recomputed(dc.turn(0, below, turns[below][-1].history, MESSAGES[2]), 2, references)


def test_sigterm_drains_a_stream_in_flight(drill_cluster: DrillCluster) -> None:
    dc, server = drill_cluster, "cache-server-2"
    node = dc.cluster.node(server)
    health_address = dc.cluster.describe()["cache_servers"][2]["health"]
    # 3 MiB of KV: below the device budget, and more than one stream's flow-control
    # window, so the server is still sending while the caller reads slowly.
    layers, heads, tokens, dim = 8, 2, 768, 64
    rng = np.random.default_rng(3)
    kv = [
        tuple(rng.standard_normal((heads, tokens, dim)).astype(np.float16) for _ in range(2))
        for _ in range(layers)
    ]
    with dc.tenant_cache(server) as cache:
        cache.put(dc.model_id, "d3-in-flight", kv, dtype="float16", policy="none", timeout_s=60)
        stream = cache.prefetch(dc.model_id, "d3-in-flight", timeout_s=60)
        received = [next(stream)]  # the call is in flight
        stopped = time.monotonic()
        dc.cluster.kill(server, signal.SIGTERM)
        # Health turns NOT_SERVING at once; the TLS port takes no new call.
        wait_for(
            lambda: plaintext_health(health_address) == "NOT_SERVING",
            "NOT_SERVING after SIGTERM",
            # "At once" on an idle machine; room for a CPU shared with other jobs.
            timeout_s=5.0,
        )
        with dc.tenant_cache(server) as fresh, pytest.raises(UnavailableError):
            fresh.stats(timeout_s=2)
        # The call in flight fits the grace period: it completes, every byte right.
        received.extend(stream)
    assert [layer for layer, _, _ in received] == list(range(layers))
    for (_, keys, values), (sent_keys, sent_values) in zip(received, kv, strict=True):
        assert np.array_equal(keys, sent_keys) and np.array_equal(values, sent_values)
    # It exits within the drain and the write-down (up to GRACE_S each), with room for
    # the interpreter's exit.
    assert dc.cluster.wait_exit(server, timeout_s=2 * GRACE_S + 10) == 0
    assert time.monotonic() - stopped < 2 * GRACE_S + 5
    records = [
        json.loads(line) for line in node.log_path.read_text().splitlines() if line.startswith("{")
    ]
    written_down = [r for r in records if r["message"] == "device tier written down"]
    assert written_down and written_down[-1]["sequences"] >= 1
    # What lived on its device was written down to Redis: restarted, it serves it.
    dc.cluster.restart(server)
    with dc.tenant_cache(server) as cache:
        restored = cache.prefetch_layers(dc.model_id, "d3-in-flight")
    for (keys, values), (sent_keys, sent_values) in zip(restored, kv, strict=True):
        assert np.array_equal(keys, sent_keys) and np.array_equal(values, sent_values)


def test_worker_killed_mid_decode_resumes_from_the_stored_input(
    drill_cluster: DrillCluster,
) -> None:
    """worker-1 dies while it decodes: it had stored the turn's input (the prefill) and
    keeps decode steps until the turn ends, so the retry on worker-0 restores the whole
    input but its last token (which runs again for its logits). worker-1 is started
    again at the end for the drill below."""
    dc = drill_cluster
    # The reference: the same turn resumed from its stored input in a healthy cluster.
    # A caller that goes away after the first token leaves the service holding the input
    # (the worker drops the decode steps it kept), as the killed worker does below.
    reference = "d5-reference"
    history = dc.turn(0, reference, [], MESSAGES[0]).history
    before = dc.lookup(reference).tokens
    with dc.worker(0) as client:
        events = client.generate(
            reference,
            history_tokens=history,
            user_message=LONG_ANSWER_MESSAGE,
            max_new_tokens=LONG_ANSWER_TOKENS,
        )
        next(iter(events))
    wait_for(lambda: dc.lookup(reference).tokens > before, "the reference's stored input")
    expected = dc.turn(0, reference, history, LONG_ANSWER_MESSAGE, LONG_ANSWER_TOKENS)
    assert expected.recompute_reason == ""
    assert expected.cached_tokens == dc.lookup(reference).tokens - len(expected.tokens)

    session = "d5-session"
    first = dc.turn(0, session, [], MESSAGES[0])
    assert first.history == history
    before = dc.lookup(session).tokens
    caller, received, failures = turn_on_a_thread(
        dc, 1, session, history, LONG_ANSWER_MESSAGE, LONG_ANSWER_TOKENS
    )
    try:
        # The prefill's put committed: the service holds the input; decoding goes on.
        held = wait_for(
            lambda: (tokens := dc.lookup(session).tokens) > before and tokens,
            "the stored prefill",
            interval_s=0.01,
        )
        dc.cluster.kill("worker-1")
        caller.join(timeout=BOUND_S)
        assert not caller.is_alive()
        assert failures and isinstance(failures[0], UnavailableError)
        assert 0 < len(received) < LONG_ANSWER_TOKENS, "the kill came after the turn"
        assert dc.lookup(session).tokens == held, "decode steps were stored"
        retry = dc.turn(0, session, history, LONG_ANSWER_MESSAGE, LONG_ANSWER_TOKENS)
        assert retry.recompute_reason == "" and retry.cached_tokens == held - 1
        assert retry.tokens == expected.tokens
        assert dc.lookup(session).tokens == len(retry.history) - 1  # the retry stored
    finally:
        dc.cluster.restart("worker-1")


def test_worker_killed_mid_turn_resumes_on_the_other(drill_cluster: DrillCluster) -> None:
    """Last in this module: worker-0 stays down (restarting it means loading the
    model again)."""
    dc = drill_cluster
    messages = [MESSAGES[0], LONG_MESSAGE]
    reference = dc.conversation(1, "d4-reference", messages)
    session = "d4-session"
    first = dc.turn(0, session, [], messages[0])
    history = first.history
    server = dc.server_of(session)
    lookups = ("minicache_requests_total", (("code", "OK"), ("method", "Lookup")))
    before = dc.metrics(server).get(lookups, 0.0)
    caller, received, failures = turn_on_a_thread(
        dc, 0, session, history, messages[1], MAX_NEW_TOKENS
    )
    # The worker looked the session up: it restores the history, then prefills the long
    # message (about a second); it dies in the middle of that.
    wait_for(
        lambda: dc.metrics(server).get(lookups, 0.0) > before,
        "the worker's Lookup",
        interval_s=0.01,
    )
    dc.cluster.kill("worker-0")
    caller.join(timeout=BOUND_S)
    assert not caller.is_alive()
    assert received == [], "the kill came after the prefill: widen LONG_MESSAGE"
    assert failures and isinstance(failures[0], UnavailableError)
    # The service still holds the first turn; the retry on the other worker resumes it.
    assert dc.lookup(session).tokens == len(history) - 1
    retry = dc.turn(1, session, history, messages[1])
    assert retry.recompute_reason == "" and retry.cached_tokens == len(history) - 1
    assert retry.tokens == reference[1].tokens
