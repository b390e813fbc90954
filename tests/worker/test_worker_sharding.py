"""Workers that shard sessions over several cache servers (MINICACHE_WORKER_CACHE_TARGETS):
real in-process workers with the real model and real cache servers, over gRPC on
loopback.

Each session lives on the server `place_sequence` picks for (model id, session id);
workers with the same target list resume each other's sessions; a stopped server's
sessions recompute (tokens identical to generation without a cache) while the other
servers' sessions still resume.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from minicache_client import ClientConfig, TurnResult, WorkerClient
from minicache_client.sharding import place_sequence
from minicache_worker.generation import TurnGenerator, TurnRequest, TurnSummary
from minicache_worker.worker_service import WorkerServer, start_worker
from minicache_worker.worker_settings import WorkerSettings

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))
from service_fixtures import ServerThread, settings_for

pytestmark = pytest.mark.model

SERVERS = 3
# Lossless, so a resumed turn and a recomputed one see the same KV.
POLICY = "none"
FIRST_MESSAGE = "Name a color."
SECOND_MESSAGE = "And a fruit?"
MAX_NEW = 3
# Sessions per server: one resumes on the second worker, one meets the outage.
RESUMED, OUTAGE = "resumed", "outage"
# Candidate session ids tried to find sessions for every server (each id has a 1 in
# SERVERS chance per server: a few dozen are plenty).
CANDIDATES = 200


@pytest.fixture(scope="module")
def cache_servers() -> Iterator[list[ServerThread]]:
    running: list[ServerThread] = []
    try:
        for _ in range(SERVERS):
            running.append(ServerThread(settings_for()))
        yield running
    finally:
        for server in reversed(running):
            if server.thread.is_alive():  # the outage test stops one itself
                server.stop()


@pytest.fixture(scope="module")
def sharded_settings(cache_servers: list[ServerThread]) -> WorkerSettings:
    return WorkerSettings(
        listen="127.0.0.1:0",
        metrics_listen="",
        insecure=True,
        log_format="text",
        cache_targets=",".join(server.address for server in cache_servers),
        cache_insecure=True,
        cache_timeout_s=5.0,
    )


@pytest.fixture(scope="module")
def workers(lm, sharded_settings: WorkerSettings) -> Iterator[list[WorkerServer]]:
    """Two workers with the same model and target list."""
    running: list[WorkerServer] = []
    try:
        for _ in range(2):
            running.append(start_worker(sharded_settings, lm=lm))
        yield running
    finally:
        for worker in running:
            worker.stop(0)


@pytest.fixture(scope="module")
def clients(workers: list[WorkerServer]) -> Iterator[list[WorkerClient]]:
    opened = [WorkerClient(ClientConfig(w.address, insecure=True)) for w in workers]
    try:
        yield opened
    finally:
        for client in opened:
            client.close()


@pytest.fixture(scope="module")
def sessions(
    cache_servers: list[ServerThread], workers: list[WorkerServer]
) -> dict[str, dict[str, str]]:
    """Server address -> {RESUMED: session id, OUTAGE: session id}, the ids placed on
    that server by rendezvous hashing."""
    addresses = [server.address for server in cache_servers]
    model_id = workers[0].generator.model_id
    placed: dict[str, list[str]] = {address: [] for address in addresses}
    for index in range(CANDIDATES):
        session_id = f"sharded-{index}"
        owners = placed[place_sequence(addresses, model_id, session_id)]
        if len(owners) < 2:
            owners.append(session_id)
        if all(len(ids) == 2 for ids in placed.values()):
            break
    assert all(len(ids) == 2 for ids in placed.values()), "too few candidate ids"
    return {
        address: dict(zip((RESUMED, OUTAGE), ids, strict=True)) for address, ids in placed.items()
    }


@pytest.fixture(scope="module")
def first_turns(
    clients: list[WorkerClient], sessions: dict[str, dict[str, str]]
) -> dict[str, TurnResult]:
    """The first turn of every session, on the first worker."""
    return {
        session_id: clients[0].turn(
            session_id, user_message=FIRST_MESSAGE, max_new_tokens=MAX_NEW, policy=POLICY
        )
        for ids in sessions.values()
        for session_id in ids.values()
    }


def second_turn(client: WorkerClient, session_id: str, first: TurnResult) -> TurnResult:
    return client.turn(
        session_id,
        history_tokens=first.turn_tokens,
        user_message=SECOND_MESSAGE,
        max_new_tokens=MAX_NEW,
        policy=POLICY,
    )


def plain_generation(lm, session_id: str, history: Sequence[int], result: TurnResult) -> list[int]:
    """The tokens of `result`'s turn generated with the whole input in a plain local
    cache (no cache service)."""
    new_tokens = list(result.turn_tokens[: len(result.turn_tokens) - len(result.tokens)])
    request = TurnRequest(session_id, list(history), new_tokens, MAX_NEW)
    *tokens, summary = TurnGenerator(lm, None).generate(request)
    assert isinstance(summary, TurnSummary)
    return tokens


def held_sessions(server: ServerThread, model_id: str) -> set[str]:
    """The session ids of `model_id` the server holds (the workers' callers have no
    tenant: the server's default one)."""
    return {sequence for _, model, sequence in server.store.sequences if model == model_id}


def test_each_session_lives_on_the_server_rendezvous_hashing_picks(
    cache_servers: list[ServerThread],
    workers: list[WorkerServer],
    sessions: dict[str, dict[str, str]],
    first_turns: dict[str, TurnResult],
) -> None:
    addresses = tuple(server.address for server in cache_servers)
    for worker in workers:
        assert worker.cache_client is not None and worker.cache_client.servers == addresses
    assert all(turn.stored for turn in first_turns.values())
    model_id = workers[0].generator.model_id
    for server in cache_servers:
        held = held_sessions(server, model_id)
        expected = set(sessions[server.address].values())
        # Every server holds its own sessions and none of the others'.
        assert held & set(first_turns) == expected
        for session_id in expected:
            assert place_sequence(addresses, model_id, session_id) == server.address
            assert workers[0].cache_client.server_for(model_id, session_id) == server.address


def test_a_session_started_on_one_worker_resumes_on_the_other(
    clients: list[WorkerClient],
    sessions: dict[str, dict[str, str]],
    first_turns: dict[str, TurnResult],
) -> None:
    for ids in sessions.values():
        session_id = ids[RESUMED]
        first = first_turns[session_id]
        resumed = second_turn(clients[1], session_id, first)
        # Restored from the session's server: every token of turn 1 but its last
        # generated one, which this turn computes with the new message.
        assert resumed.recompute_reason == ""
        assert resumed.cached_tokens == len(first.turn_tokens) - 1 > 0
        message_tokens = len(resumed.turn_tokens) - len(resumed.tokens)
        assert resumed.prefilled_tokens == message_tokens + 1
        assert resumed.stored


def test_a_stopped_server_recomputes_its_sessions_the_others_resume(
    lm,
    cache_servers: list[ServerThread],
    workers: list[WorkerServer],
    clients: list[WorkerClient],
    sessions: dict[str, dict[str, str]],
    first_turns: dict[str, TurnResult],
) -> None:
    stopped, *alive = cache_servers
    stopped.stop()
    unavailable_before = workers[1].metrics.recomputes.value(reason="unavailable")

    session_id = sessions[stopped.address][OUTAGE]
    first = first_turns[session_id]
    recomputed = second_turn(clients[1], session_id, first)
    assert recomputed.cached_tokens == 0
    assert recomputed.recompute_reason == "unavailable"
    assert recomputed.prefilled_tokens == len(first.turn_tokens) + (
        len(recomputed.turn_tokens) - len(recomputed.tokens)
    )
    assert not recomputed.stored  # its server is down: the turn is not cached
    assert workers[1].metrics.recomputes.value(reason="unavailable") == unavailable_before + 1
    assert list(recomputed.tokens) == plain_generation(
        lm, session_id, first.turn_tokens, recomputed
    )

    # New sessions placed on the stopped server answer too, uncached, in either residency
    # (a remote turn's decode steps fall back to a local cache).
    addresses = [server.address for server in cache_servers]
    model_id = workers[1].generator.model_id
    new_sessions = [
        session_id
        for session_id in (f"sharded-new-{index}" for index in range(CANDIDATES))
        if place_sequence(addresses, model_id, session_id) == stopped.address
    ]
    assert len(new_sessions) >= 2, "too few candidate ids"
    for session_id, residency in zip(new_sessions[:2], ("local", "remote"), strict=True):
        fresh = clients[1].turn(
            session_id,
            user_message=FIRST_MESSAGE,
            max_new_tokens=MAX_NEW,
            policy=POLICY,
            residency=residency,
        )
        assert (fresh.residency, fresh.stored) == (residency, False)
        assert list(fresh.tokens) == plain_generation(lm, session_id, (), fresh)

    for server in alive:
        session_id = sessions[server.address][OUTAGE]
        first = first_turns[session_id]
        resumed = second_turn(clients[1], session_id, first)
        assert resumed.recompute_reason == ""
        assert resumed.cached_tokens == len(first.turn_tokens) - 1 > 0
        assert resumed.stored
    assert clients[1].health() == "SERVING"
