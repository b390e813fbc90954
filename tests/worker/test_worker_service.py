"""The worker service over real gRPC on loopback: turns against the real model, sessions
resumed on a second worker through a real cache server, bad requests, auth, settings,
the turn queue, and the chat-turn rendering."""

from __future__ import annotations

import logging
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minicache_client import (
    CacheError,
    ClientConfig,
    Conversation,
    GeneratedToken,
    InvalidArgumentError,
    ResourceExhaustedError,
    TurnResult,
    UnauthenticatedError,
    WorkerClient,
)
from minicache_client.serving.settings import SettingsError
from minicache_worker.chat_turns import user_turn_tokens
from minicache_worker.cli import build_parser, main
from minicache_worker.generation import TurnGenerator, TurnRequest, TurnSummary
from minicache_worker.worker_service import (
    CallerGoneError,
    QueueFullError,
    TurnQueue,
    WorkerServer,
    WorkerUnavailableError,
    start_worker,
)
from minicache_worker.worker_settings import (
    WorkerSettings,
    load_worker_settings,
    settings_from,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))
from service_fixtures import ServerThread, settings_for
from test_hostile_input import (
    BAD_UTF8,
    HUGE_POLICY,
    HUGE_POLICY_NAME,
    NESTED_POLICY,
    UNDECODABLE,
    broken_utf8,
    wait_for,
)

from minicache_client.proto import worker_service_pb2 as worker_pb
from minicache_client.protocol import MAX_POLICY_BYTES
from minicache_client.serving.rpc_methods import MAX_DETAILS_BYTES

MAX_NEW_TOKENS_LIMIT = 64
WORKER_TOKEN = "worker-token-0123456789"
OTHER_TOKEN = "other-token-0123456789"


def worker_settings(**overrides) -> WorkerSettings:
    values = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "insecure": True,
        "log_format": "text",
        "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT,
        **overrides,
    }
    return WorkerSettings(**values)


@pytest.fixture(scope="module")
def kv_server() -> Iterator[ServerThread]:
    running = ServerThread(settings_for())
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cached_worker_settings(kv_server: ServerThread) -> WorkerSettings:
    return worker_settings(cache_targets=kv_server.address, cache_insecure=True)


@pytest.fixture(scope="module")
def worker(lm, cached_worker_settings) -> Iterator[WorkerServer]:
    running = start_worker(cached_worker_settings, lm=lm)
    try:
        yield running
    finally:
        running.stop(0)


@pytest.fixture(scope="module")
def client(worker: WorkerServer) -> Iterator[WorkerClient]:
    with WorkerClient(ClientConfig(worker.address, insecure=True)) as running:
        yield running


# -- turns over gRPC ----------------------------------------------------------------------


@pytest.mark.model
def test_turn_equals_turn_generator(lm, client: WorkerClient) -> None:
    message = "What is the capital of France?"
    events = list(client.generate("direct-1", user_message=message, max_new_tokens=8))
    result = events[-1]
    assert isinstance(result, TurnResult)
    assert all(isinstance(event, GeneratedToken) for event in events[:-1])

    prompt = user_turn_tokens(lm.tokenizer, [], message)
    direct = list(
        TurnGenerator(lm, None).generate(TurnRequest("direct-1", [], prompt, max_new_tokens=8))
    )
    assert isinstance(direct[-1], TurnSummary)
    assert list(result.tokens) == direct[:-1]
    assert list(result.turn_tokens) == direct[-1].turn_tokens == [*prompt, *result.tokens]
    assert result.text == "".join(event.text for event in events[:-1])
    assert "Paris" in result.text
    assert result.generated_tokens == len(result.tokens)
    assert result.prefilled_tokens == len(prompt)
    assert (result.cached_tokens, result.recompute_reason) == (0, "")
    assert result.stored
    assert result.residency == "local"


@pytest.mark.model
def test_session_resumes_on_a_second_worker(
    lm, client: WorkerClient, cached_worker_settings: WorkerSettings
) -> None:
    second = start_worker(cached_worker_settings, lm=lm)
    try:
        with WorkerClient(ClientConfig(second.address, insecure=True)) as other:
            on_one = Conversation(client, "resume-one", policy="none")
            moved = Conversation(client, "resume-moved", policy="none")
            first_turns = [c.say("Hi! Name a fruit.", max_new_tokens=6) for c in (on_one, moved)]
            assert first_turns[0].tokens == first_turns[1].tokens

            reply = on_one.say("And a vegetable?", max_new_tokens=6)
            moved.client = other
            resumed = moved.say("And a vegetable?", max_new_tokens=6)
    finally:
        second.stop(0)
    # The service holds every token of turn 1 but its last generated one, which the
    # next turn computes with the new message.
    assert resumed.cached_tokens == len(first_turns[1].turn_tokens) - 1 > 0
    assert resumed.recompute_reason == ""
    message_tokens = len(resumed.turn_tokens) - len(resumed.tokens)
    assert resumed.prefilled_tokens == message_tokens + 1
    assert resumed.tokens == reply.tokens
    assert resumed.turn_tokens == reply.turn_tokens
    assert moved.history_tokens == on_one.history_tokens


@pytest.mark.model
def test_prefill_on_one_worker_decode_on_another(
    lm, client: WorkerClient, cached_worker_settings: WorkerSettings
) -> None:
    message = "Count from one to five."
    whole = client.turn("split-whole", user_message=message, max_new_tokens=6, policy="none")
    prefill = client.turn("split", user_message=message, max_new_tokens=1, policy="none")
    second = start_worker(cached_worker_settings, lm=lm)
    try:
        with WorkerClient(ClientConfig(second.address, insecure=True)) as other:
            decode = other.turn("split", history_tokens=prefill.turn_tokens, max_new_tokens=5)
    finally:
        second.stop(0)
    assert decode.cached_tokens == len(prefill.turn_tokens) - 1
    assert decode.prefilled_tokens == 1
    assert decode.turn_tokens == decode.tokens  # no message: only the generated tokens
    assert prefill.tokens + decode.tokens == whole.tokens


@pytest.mark.model
def test_cancelled_turn_is_not_taken_for_the_next(
    worker: WorkerServer, client: WorkerClient
) -> None:
    conversation = Conversation(client, "cancelled", policy="none")
    conversation.say("Hi", max_new_tokens=2)
    events = client.generate(
        "cancelled",
        history_tokens=conversation.history_tokens,
        user_message="Tell me about cats.",
        max_new_tokens=12,
    )
    assert isinstance(next(events), GeneratedToken)
    events.close()  # cancels the call: the service holds KV of a turn the caller never got
    retried = conversation.say("What is the capital of France?", max_new_tokens=2)
    # Not this history's KV (its digest differs): recomputed, not reused.
    assert (retried.cached_tokens, retried.recompute_reason) == (0, "mismatch")
    assert worker.servicer.queue.waiting == 0


# -- bad requests ---------------------------------------------------------------------------


BAD_REQUESTS = {
    "session id": ({"session_id": "not a valid id!"}, "session_id must be"),
    "long session id": ({"session_id": "s" * 129}, "session_id must be"),
    "max_new_tokens 0": ({"max_new_tokens": 0}, "max_new_tokens must be between 1"),
    "max_new_tokens above the limit": (
        {"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1},
        f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}",
    ),
    "token outside the vocabulary": ({"new_tokens": [10**6]}, "outside the vocabulary"),
    "negative token": ({"history_tokens": [1, -5]}, "outside the vocabulary"),
    "empty input": ({"user_message": ""}, "at least one input token"),
    "context overflow": ({"history_tokens": [1] * 9000}, "context of"),
    "unknown policy": ({"policy": "fastest"}, "unknown policy"),
    "malformed policy JSON": ({"policy": "{not json"}, "policy:"),
}


@pytest.mark.model
@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument(client: WorkerClient, name: str) -> None:
    changes, message = BAD_REQUESTS[name]
    request = {"session_id": "bad-request", "user_message": "Hello", "max_new_tokens": 2}
    request.update(changes)
    session_id = request.pop("session_id")
    with pytest.raises(InvalidArgumentError, match=message) as raised:
        client.turn(session_id, **request)
    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.model
def test_worker_serves_after_bad_requests(client: WorkerClient) -> None:
    for changes, _ in BAD_REQUESTS.values():
        request = {"user_message": "Hello", "max_new_tokens": 2, **changes}
        with pytest.raises(InvalidArgumentError):
            client.turn(request.pop("session_id", "after-bad"), **request)
    result = client.turn("after-bad", user_message="Hello", max_new_tokens=1)
    assert result.generated_tokens == 1


@pytest.mark.model
def test_unexpected_failure_is_internal_without_details(
    worker: WorkerServer, client: WorkerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(request):
        raise RuntimeError("secret internal state")
        yield  # pragma: no cover - makes this a generator

    monkeypatch.setattr(worker.generator, "generate", broken)
    with pytest.raises(CacheError) as raised:
        client.turn("broken", user_message="Hello", max_new_tokens=1)
    assert raised.value.code is grpc.StatusCode.INTERNAL
    assert "secret" not in str(raised.value)


# -- hostile bytes (tests/service/test_hostile_input.py does the cache server) ---------------

GENERATE = "/minicache.v1.WorkerService/Generate"


def raw_generate(worker: WorkerServer, data: bytes, timeout: float = 10) -> list[bytes]:
    """Generate with `data` as the request's bytes, through identity serializers."""
    with grpc.insecure_channel(worker.address) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        return list(call(data, timeout=timeout))


def hostile_generate_cases() -> list:
    cases = [pytest.param(data, id=name) for name, data in UNDECODABLE.items()]
    for field in ("session_id", "user_message", "policy"):
        values = {"session_id": "hostile", "user_message": "Hi", "policy": "none", field: "Q~Q"}
        request = worker_pb.GenerateRequest(max_new_tokens=1, **values)
        for name, bad in BAD_UTF8.items():
            data = broken_utf8(request, "Q~Q", bad)
            cases.append(pytest.param(data, id=f"{field}-{name}"))
    return cases


def assert_no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.levelno < logging.ERROR, f"ERROR logged: {record.getMessage()[:300]}"
        assert record.exc_info is None, f"traceback logged: {record.getMessage()[:300]}"


@pytest.mark.model
@pytest.mark.parametrize("data", hostile_generate_cases())
def test_undecodable_generate_is_invalid_argument(
    worker: WorkerServer, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.RpcError) as raised:
        raw_generate(worker, data)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid minicache.v1.GenerateRequest message" in raised.value.details()
    assert len(raised.value.details().encode()) <= MAX_DETAILS_BYTES
    assert_no_error_logged(caplog)


@pytest.mark.model
@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (NESTED_POLICY, "nests deeper than"),
        (HUGE_POLICY, f"more than the limit of {MAX_POLICY_BYTES}"),
        (HUGE_POLICY_NAME, "unknown policy 'ppp"),
    ],
    ids=["nested", "huge_json", "huge_name"],
)
def test_hostile_policy_is_invalid_argument_with_bounded_details(
    worker: WorkerServer, caplog: pytest.LogCaptureFixture, policy: str, message: str
) -> None:
    caplog.set_level(logging.INFO)
    request = worker_pb.GenerateRequest(
        session_id="hostile", user_message="Hi", max_new_tokens=1, policy=policy
    )
    with pytest.raises(grpc.RpcError) as raised:
        raw_generate(worker, request.SerializeToString())
    details = raised.value.details()
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, details[:300]
    assert message in details and len(details.encode()) <= MAX_DETAILS_BYTES
    assert_no_error_logged(caplog)


@pytest.mark.model
def test_generate_cancelled_mid_stream_is_no_server_error(
    worker: WorkerServer, client: WorkerClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    requests = worker.metrics.requests
    cancelled = requests.value(method="Generate", code="CANCELLED")
    ok = requests.value(method="Generate", code="OK")
    request = worker_pb.GenerateRequest(
        session_id="hostile-cancel", user_message="Tell me a story.", max_new_tokens=32
    )
    with grpc.insecure_channel(worker.address) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        responses = call(request.SerializeToString(), timeout=30)
        first = worker_pb.GenerateResponse.FromString(next(responses))
        assert first.WhichOneof("event") == "token"
        responses.cancel()
    # Queued behind the cancelled turn: runs once that one stopped.
    assert client.turn("after-cancel", user_message="Hi", max_new_tokens=1).generated_tokens == 1
    assert worker.servicer.queue.waiting == 0
    # The server counts a call once its handler returns, which can trail the client.
    wait_for(
        lambda: requests.value(method="Generate", code="CANCELLED") == cancelled + 1,
        "the cancelled Generate counted CANCELLED",
    )
    wait_for(
        lambda: requests.value(method="Generate", code="OK") == ok + 1,
        "the completed Generate counted OK",
    )
    assert worker.metrics.request_seconds.count(method="Generate") >= 2
    assert_no_error_logged(caplog)


# -- auth, health, metrics ------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_worker(lm, kv_server: ServerThread) -> Iterator[WorkerServer]:
    settings = worker_settings(
        tokens=f"{WORKER_TOKEN}=team,{OTHER_TOKEN}=other-team",
        metrics_listen="127.0.0.1:0",
        cache_targets=kv_server.address,
        cache_insecure=True,
    )
    running = start_worker(settings, lm=lm)
    try:
        yield running
    finally:
        running.stop(0)


@pytest.mark.model
def test_token_required_when_tokens_are_set(guarded_worker: WorkerServer) -> None:
    for token in ("", "wrong-token-0123456789"):
        with (
            WorkerClient(ClientConfig(guarded_worker.address, insecure=True, token=token)) as c,
            pytest.raises(UnauthenticatedError, match="bearer token"),
        ):
            c.turn("auth", user_message="Hello", max_new_tokens=1)
    config = ClientConfig(guarded_worker.address, insecure=True, token=WORKER_TOKEN)
    with WorkerClient(config) as allowed:
        assert allowed.turn("auth", user_message="Hello", max_new_tokens=1).generated_tokens == 1


@pytest.mark.model
def test_tenants_do_not_share_sessions(guarded_worker: WorkerServer) -> None:
    def client_of(token: str) -> WorkerClient:
        return WorkerClient(ClientConfig(guarded_worker.address, insecure=True, token=token))

    with client_of(WORKER_TOKEN) as owner, client_of(OTHER_TOKEN) as other:
        first = owner.turn("shared-id", user_message="My secret is 42.", max_new_tokens=2)
        history = first.turn_tokens
        intruder = other.turn("shared-id", history_tokens=history, max_new_tokens=1)
        resumed = owner.turn("shared-id", history_tokens=history, max_new_tokens=1)
    assert (intruder.cached_tokens, intruder.recompute_reason) == (0, "miss")
    assert resumed.cached_tokens == len(history) - 1


@pytest.mark.model
def test_health_answers_without_token(guarded_worker: WorkerServer) -> None:
    with WorkerClient(ClientConfig(guarded_worker.address, insecure=True)) as anonymous:
        assert anonymous.health() == "SERVING"


@pytest.mark.model
def test_metrics_endpoint_counts_turns(guarded_worker: WorkerServer) -> None:
    config = ClientConfig(guarded_worker.address, insecure=True, token=WORKER_TOKEN)
    with WorkerClient(config) as allowed:
        allowed.turn("metrics", user_message="Hi", max_new_tokens=1)
    # The turn's call is counted once its handler returns, which can trail the client.
    requests = guarded_worker.metrics.requests
    wait_for(lambda: requests.value(method="Generate", code="OK") >= 1, "Generate counted OK")
    url = f"http://127.0.0.1:{guarded_worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples[("minicache_worker_turns_total", (("residency", "local"),))] >= 1
    generate_ok = (("code", "OK"), ("method", "Generate"))
    assert samples[("minicache_worker_requests_total", generate_ok)] >= 1
    assert samples[("minicache_worker_request_seconds_count", (("method", "Generate"),))] >= 1
    assert families["minicache_worker_request_seconds"].type == "histogram"
    assert samples[("minicache_worker_generated_tokens_total", ())] >= 1
    assert samples[("minicache_worker_prefilled_tokens_total", ())] >= 1
    ttft = "minicache_worker_time_to_first_token_seconds_count"
    assert samples[(ttft, (("resumed", "false"),))] >= 1
    assert families["minicache_worker_time_to_first_token_seconds"].type == "histogram"
    for counter in ("resumed_turns", "recomputes", "store_failures"):
        assert families[f"minicache_worker_{counter}"].type == "counter"


@pytest.mark.model
def test_stopped_worker_is_not_serving(lm) -> None:
    running = start_worker(worker_settings(), lm=lm)
    with WorkerClient(ClientConfig(running.address, insecure=True, timeout_s=2)) as c:
        assert c.health() == "SERVING"
        running.stop(0)
        with pytest.raises(CacheError) as raised:
            c.turn("stopped", user_message="Hello", max_new_tokens=1, timeout_s=2)
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.model
def test_full_queue_and_draining_over_grpc(lm) -> None:
    running = start_worker(worker_settings(max_queue=1), lm=lm)
    outcome: list[BaseException] = []

    def wait_in_queue() -> None:
        try:
            c.turn("queued", user_message="Hello", max_new_tokens=1)
        except CacheError as exc:
            outcome.append(exc)

    try:
        with (
            WorkerClient(ClientConfig(running.address, insecure=True)) as c,
            running.servicer.queue.turn(lambda: True),  # the model is busy
        ):
            waiter = threading.Thread(target=wait_in_queue)
            waiter.start()
            while running.servicer.queue.waiting < 1 and waiter.is_alive():
                threading.Event().wait(0.01)
            with pytest.raises(ResourceExhaustedError, match="queue is full"):
                c.turn("refused", user_message="Hello", max_new_tokens=1)
            running.servicer.queue.close()  # what stop() does first: waiting turns leave
            waiter.join(5)
    finally:
        running.stop(0)
    assert [exc.code for exc in outcome] == [grpc.StatusCode.UNAVAILABLE]
    assert "shutting down" in str(outcome[0])


# -- the turn queue -------------------------------------------------------------------------


def test_turn_queue_refuses_beyond_its_waiting_places() -> None:
    queue = TurnQueue(max_waiting=1)
    started, release = threading.Event(), threading.Event()
    waited: list[str] = []

    def hold() -> None:
        with queue.turn(lambda: True):
            started.set()
            release.wait(5)

    def wait_behind() -> None:
        with queue.turn(lambda: True):
            waited.append("ran")

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(5)
    waiter = threading.Thread(target=wait_behind)
    waiter.start()
    deadline = threading.Event()
    while queue.waiting < 1 and not deadline.wait(0.01):
        pass
    with pytest.raises(QueueFullError, match="queue is full"), queue.turn(lambda: True):
        pass
    release.set()
    holder.join(5)
    waiter.join(5)
    assert waited == ["ran"]


def test_turn_queue_lets_a_departed_caller_go_and_refuses_when_closed() -> None:
    queue = TurnQueue(max_waiting=2)
    with queue.turn(lambda: True):
        with pytest.raises(CallerGoneError), queue.turn(lambda: False):
            pass
        queue.close()
        with pytest.raises(WorkerUnavailableError, match="shutting down"), queue.turn(lambda: True):
            pass
    assert queue.waiting == 0


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"MINICACHE_WORKER_MAX_QUEUE": "many"}, "MINICACHE_WORKER_MAX_QUEUE"),
        ({"MINICACHE_WORKER_MAX_QUEUE": "-1"}, "MINICACHE_WORKER_MAX_QUEUE"),
        ({"MINICACHE_WORKER_RESIDENCY": "far"}, "MINICACHE_WORKER_RESIDENCY"),
        ({"MINICACHE_WORKER_KV_DTYPE": "int8"}, "MINICACHE_WORKER_KV_DTYPE"),
        ({"MINICACHE_WORKER_MAX_NEW_TOKENS_LIMIT": "5000"}, "MINICACHE_WORKER_MAX_NEW_TOKENS"),
        ({"MINICACHE_WORKER_CACHE_TIMEOUT_S": "0"}, "MINICACHE_WORKER_CACHE_TIMEOUT_S"),
        ({"MINICACHE_WORKER_INSECURE": "maybe"}, "MINICACHE_WORKER_INSECURE"),
        ({}, "MINICACHE_WORKER_INSECURE"),  # neither TLS nor tokens, and not insecure
        (
            {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_CACHE_TARGETS": "host:1"},
            "MINICACHE_WORKER_CACHE_INSECURE",
        ),
        *(
            (
                {
                    "MINICACHE_WORKER_INSECURE": "1",
                    "MINICACHE_WORKER_CACHE_TARGETS": targets,
                    "MINICACHE_WORKER_CACHE_INSECURE": "1",
                },
                "MINICACHE_WORKER_CACHE_TARGETS",
            )
            for targets in (
                "no port",
                "host:1,no port",
                "host:1,,host:2",  # an empty entry
                "host:1,",
                " , ",
                "host:1,host:2,host:1",  # a duplicate
                "host:0",
                "host:65536",
                "host:-1",
                ":50051",
            )
        ),
        (
            # The retired single-server variable is refused, not silently ignored.
            {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_CACHE_TARGET": "host:1"},
            "MINICACHE_WORKER_CACHE_TARGETS",
        ),
        (
            {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_TOKENS": "short=team"},
            "MINICACHE_WORKER_TOKENS",
        ),
        (
            {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_TOKENS": f"{WORKER_TOKEN}=a/b"},
            "MINICACHE_WORKER_TOKENS",
        ),
        (
            {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_DEFAULT_POLICY": "fastest"},
            "MINICACHE_WORKER_DEFAULT_POLICY",
        ),
        (
            {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_TLS_CERT": "/no/such.pem"},
            "MINICACHE_WORKER_TLS_CERT",
        ),
    ],
)
def test_settings_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_worker_settings([], environ)


def test_flags_win_over_env() -> None:
    environ = {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_MAX_QUEUE": "3"}
    assert load_worker_settings([], environ).max_queue == 3
    settings = load_worker_settings(["--max-queue", "5", "--residency", "remote"], environ)
    assert (settings.max_queue, settings.residency) == (5, "remote")
    assert settings.listen == "127.0.0.1:50061"


def test_serve_refuses_bad_settings_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MINICACHE_WORKER_RESIDENCY", "everywhere")
    assert main(["serve", "--insecure"]) == 2
    assert "MINICACHE_WORKER_RESIDENCY" in capsys.readouterr().err


def test_serve_subcommand_reads_the_settings() -> None:
    args = build_parser().parse_args(["serve", "--insecure", "--cache-timeout-s", "2.5"])
    settings = settings_from(args, environ={})
    assert settings.insecure and settings.cache_timeout_s == 2.5
    assert settings.cache_client_configs() == ()


def test_cache_targets_share_the_cache_settings(tmp_path: Path) -> None:
    token_file = tmp_path / "cache-token"
    token_file.write_text("cache-token-0123456789\n")
    environ = {
        "MINICACHE_WORKER_INSECURE": "1",
        "MINICACHE_WORKER_CACHE_TARGETS": " 127.0.0.1:50051, cache-1:50052 ,[::1]:50053",
        "MINICACHE_WORKER_CACHE_TOKEN_FILE": str(token_file),
        "MINICACHE_WORKER_CACHE_INSECURE": "1",
        "MINICACHE_WORKER_CACHE_TIMEOUT_S": "2.5",
    }
    settings = load_worker_settings([], environ)
    targets = ("127.0.0.1:50051", "cache-1:50052", "[::1]:50053")
    assert settings.cache_target_list == targets
    configs = settings.cache_client_configs()
    assert tuple(config.target for config in configs) == targets
    for config in configs:
        assert config.token == "cache-token-0123456789"
        assert config.insecure and config.timeout_s == 2.5
    # One server is a list of one; the flag wins over the env var.
    single = load_worker_settings(["--cache-targets", "cache-0:50051"], environ)
    assert single.cache_target_list == ("cache-0:50051",)


# -- chat turns -------------------------------------------------------------------------------


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.model
def test_first_turn_is_the_chat_template(lm) -> None:
    message = [{"role": "user", "content": "Hi there"}]
    assert user_turn_tokens(lm.tokenizer, [], "Hi there") == _chat_ids(lm.tokenizer, message)


@pytest.mark.model
def test_continuation_matches_the_whole_conversation(lm) -> None:
    tokenizer = lm.tokenizer
    eos = tokenizer.eos_token_id
    first = user_turn_tokens(tokenizer, [], "Hi there")
    reply = tokenizer("Hello! How can I help?", add_special_tokens=False)["input_ids"]
    history = [*first, *reply, eos]  # the model stopped on its end-of-turn token
    continuation = user_turn_tokens(tokenizer, history, "Tell me a joke")
    assert continuation[0] != eos  # the turn is not closed twice
    conversation = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    whole = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode([*history, *continuation]) == whole
    assert [*history, *continuation] == _chat_ids(tokenizer, conversation)


@pytest.mark.model
def test_continuation_closes_an_unfinished_reply(lm) -> None:
    tokenizer = lm.tokenizer
    first = user_turn_tokens(tokenizer, [], "Hi there")
    cut = tokenizer("Hello! How", add_special_tokens=False)["input_ids"]  # max_new_tokens hit
    continuation = user_turn_tokens(tokenizer, [*first, *cut], "Go on")
    assert continuation[0] == tokenizer.eos_token_id
    assert tokenizer.decode(continuation).endswith("Go on<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_without_a_chat_template_gets_the_raw_text() -> None:
    class PlainTokenizer:
        chat_template = None
        eos_token_id = 0

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            assert not add_special_tokens
            return {"input_ids": [ord(c) for c in text]}

    assert user_turn_tokens(PlainTokenizer(), [5, 6], "hi") == [ord("h"), ord("i")]
