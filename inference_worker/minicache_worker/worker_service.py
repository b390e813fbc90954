"""The worker's gRPC service (`minicache.v1.WorkerService`) and its assembly.

`WorkerServicer.Generate` turns a request into a `TurnRequest` (the user message
rendered as a new chat turn, `chat_turns`), runs it on the `TurnGenerator` and streams
the tokens, then the summary. The model is CPU bound, so turns run one at a time
(`TurnQueue`); up to `max_queue` more wait, beyond that a call gets RESOURCE_EXHAUSTED.
The servicer only raises: the method is registered through
`minicache_client.serving.rpc_methods` (the cache server's one wrapper), which maps
errors to status codes with `STATUS_CODES`, answers undecodable requests
INVALID_ARGUMENT, counts a caller that left as CANCELLED, and answers anything else
INTERNAL, its traceback in the log only.

`start_worker(settings, lm=None)` binds the port (port 0 picks a free one: tests use
it), adds the library's health service and reflection, the bearer-token check, TLS when
configured and the metrics HTTP endpoint, then loads the model (unless `lm` is given):
health is NOT_SERVING, and Generate UNAVAILABLE, until the model is ready.
`WorkerServer.stop()` drains: health turns NOT_SERVING, waiting turns get UNAVAILABLE,
the running turn gets `grace_s` to finish.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from minicache_client import CacheError, InvalidArgumentError, ShardedCacheClient
from minicache_client.policy import ModelShape, policy_for_model
from minicache_client.proto import worker_service_pb2 as pb
from minicache_client.proto import worker_service_pb2_grpc as pb_grpc
from minicache_client.protocol import requested_policy
from minicache_client.serving.auth import SyncAuthInterceptor, TokenAuth
from minicache_client.serving.metrics import serve_metrics
from minicache_client.serving.rpc_methods import RpcOutcomes, add_service
from minicache_client.serving.settings import SettingsError, split_address
from minicache_client.serving.tls import server_credentials
from minicache_worker.chat_turns import user_turn_tokens
from minicache_worker.generation import Residency, TurnGenerator, TurnRequest, TurnSummary
from minicache_worker.models import LoadedModel, load_model
from minicache_worker.worker_metrics import WorkerMetrics
from minicache_worker.worker_settings import WorkerSettings, env_name

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["WorkerService"]
SERVICE_NAME = SERVICE.full_name
SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Threads beyond the admitted turns: health checks, reflection and refusals are
# answered while every admitted turn holds a thread.
SPARE_THREADS = 4
# How often a waiting turn checks whether its caller is still there.
WAIT_POLL_S = 0.2

_RESIDENCY_FROM_PROTO = {pb.RESIDENCY_LOCAL: Residency.LOCAL, pb.RESIDENCY_REMOTE: Residency.REMOTE}
_RESIDENCY_TO_PROTO = {value: key for key, value in _RESIDENCY_FROM_PROTO.items()}


class QueueFullError(Exception):
    """Every place in the worker's queue is taken."""


class WorkerUnavailableError(Exception):
    """The worker cannot take turns now: its model is loading, or it is shutting down."""


class CallerGoneError(Exception):
    """The caller cancelled, or its deadline passed, while its turn waited."""


# Domain errors -> status codes, most specific first. A cache service error is never
# the caller's: one that escapes the generator is a bug, reported as INTERNAL.
STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode | None], ...] = (
    (CallerGoneError, grpc.StatusCode.CANCELLED),
    (CacheError, None),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_code_of(error: Exception) -> grpc.StatusCode | None:
    """The status code of a domain error; None for an unexpected one."""
    return next((code for kind, code in STATUS_CODES if isinstance(error, kind)), None)


class TurnQueue:
    """One turn runs at a time; at most `max_waiting` more wait for it, in no
    guaranteed order. `close()` refuses new and waiting turns (the running one ends)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._changed = threading.Condition()
        self._admitted = 0  # the running turn and the waiting ones
        self._running = False
        self._closed = False

    @property
    def waiting(self) -> int:
        with self._changed:
            return self._admitted - int(self._running)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @contextlib.contextmanager
    def turn(self, caller_active: Callable[[], bool]) -> Iterator[None]:
        """Holds the model for one turn; raises QueueFullError, WorkerUnavailableError
        (closed) or CallerGoneError (the caller left while waiting)."""
        with self._changed:
            if self._closed:
                raise WorkerUnavailableError("the worker is shutting down")
            if self._admitted > self.max_waiting:
                raise QueueFullError(
                    f"the worker's queue is full ({self.max_waiting} turns wait behind the "
                    "running one): retry later or on another worker"
                )
            self._admitted += 1
            try:
                while self._running or self._closed:
                    if self._closed:
                        raise WorkerUnavailableError("the worker is shutting down")
                    if not caller_active():
                        raise CallerGoneError
                    self._changed.wait(WAIT_POLL_S)
                self._running = True
            except BaseException:
                self._admitted -= 1
                raise
        try:
            yield
        finally:
            with self._changed:
                self._running = False
                self._admitted -= 1
                self._changed.notify_all()


def check_policy(policy: str, shape: ModelShape) -> None:
    """Refuse a policy the cache service would refuse (it would only fail the store);
    `default` fits every model (the service falls back for models it was not
    calibrated for)."""
    if not policy:
        return
    try:
        policy_for_model(requested_policy(policy), shape)
    except InvalidArgumentError as exc:  # the request's fault, not the cache service's
        raise ValueError(str(exc)) from None
    except ValueError as exc:
        raise ValueError(f"policy: {exc}") from None


def summary_message(summary: TurnSummary) -> pb.TurnSummary:
    return pb.TurnSummary(
        turn_tokens=summary.turn_tokens,
        cached_tokens=summary.cached_tokens,
        prefilled_tokens=summary.prefilled_tokens,
        generated_tokens=summary.generated_tokens,
        time_to_first_token_s=summary.time_to_first_token_s,
        decode_tokens_per_s=summary.decode_tokens_per_s,
        recompute_reason=summary.recompute_reason.value,
        stored=summary.stored,
        residency=_RESIDENCY_TO_PROTO[summary.residency],
    )


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """Generate: protobuf in, a turn of the `TurnGenerator`, protobuf out."""

    def __init__(self, settings: WorkerSettings, auth: TokenAuth) -> None:
        self.settings = settings
        self.auth = auth
        self.generator: TurnGenerator | None = None  # set once the model is loaded
        self.queue = TurnQueue(settings.max_queue)
        # Requests render their message before they queue; a fast tokenizer must not be
        # used by two threads at once.
        self.tokenizer_lock = threading.Lock()
        self.default_residency = Residency(settings.residency)
        self.default_policy = settings.policy_for_requests()

    def sequence_id(self, session_id: str, context: grpc.ServicerContext) -> str:
        """The session's id in the cache service: inside the caller's tenant when the
        worker has tokens, so one tenant's session ids never reach another's KV."""
        if not self.auth.required:
            return session_id
        return f"{self.auth.tenant_of(context)}/{session_id}"

    def turn_request(
        self, request: pb.GenerateRequest, generator: TurnGenerator, sequence_id: str
    ) -> TurnRequest:
        """The domain request; ValueError names what is wrong with the message."""
        if not SESSION_ID.match(request.session_id):
            raise ValueError(
                f"session_id must be 1 to 128 characters of [A-Za-z0-9._:-], got "
                f"{request.session_id[:140]!r}"
            )
        limit = self.settings.max_new_tokens_limit
        if not 1 <= request.max_new_tokens <= limit:
            raise ValueError(
                f"max_new_tokens must be between 1 and {limit}, got {request.max_new_tokens}"
            )
        if request.residency == pb.RESIDENCY_UNSPECIFIED:
            residency = self.default_residency
        elif request.residency in _RESIDENCY_FROM_PROTO:
            residency = _RESIDENCY_FROM_PROTO[request.residency]
        else:
            raise ValueError(f"unknown residency {request.residency}")
        policy = request.policy or self.default_policy
        check_policy(policy, generator.lm.shape)
        history = list(request.history_tokens)
        new_tokens: list[int] = []
        if request.user_message:
            with self.tokenizer_lock:
                new_tokens = user_turn_tokens(
                    generator.lm.tokenizer,
                    history,
                    request.user_message,
                    stop_tokens=generator.stop_tokens,
                )
        new_tokens.extend(request.new_tokens)
        if not history and not new_tokens:
            raise ValueError(
                "a turn needs at least one input token: give user_message, new_tokens or "
                "history_tokens"
            )
        return TurnRequest(
            session_id=sequence_id,
            history_tokens=history,
            new_tokens=new_tokens,
            max_new_tokens=request.max_new_tokens,
            policy=policy,
            residency=residency,
        )

    def Generate(  # noqa: N802 - the RPC's name in the proto
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        generator = self.generator
        if generator is None:
            raise WorkerUnavailableError("the worker is loading its model: retry shortly")
        turn = self.turn_request(request, generator, self.sequence_id(request.session_id, context))
        with self.queue.turn(context.is_active):
            yield from self._stream_turn(generator, turn, context)

    def _stream_turn(
        self, generator: TurnGenerator, turn: TurnRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        # A turn the caller leaves early keeps what it stored: its input's KV under their
        # digest (the decode steps it kept are dropped), which a retry of the same turn
        # resumes and a next turn with another message does not match.
        with contextlib.closing(generator.generate(turn)) as events:
            for event in events:
                if isinstance(event, TurnSummary):
                    self._log_turn(turn, event)
                    yield pb.GenerateResponse(summary=summary_message(event))
                else:
                    yield pb.GenerateResponse(token=self._token_message(generator, event))
                if not context.is_active():
                    return  # the caller left: stop computing for nobody

    def _token_message(self, generator: TurnGenerator, token: int) -> pb.GeneratedToken:
        # Special tokens (the end of a turn) have no text of their own.
        with self.tokenizer_lock:
            text = generator.lm.tokenizer.decode([token], skip_special_tokens=True)
        return pb.GeneratedToken(token_id=token, text=text)

    @staticmethod
    def _log_turn(turn: TurnRequest, summary: TurnSummary) -> None:
        log.info(
            "turn generated",
            extra={
                "session_id": turn.session_id,
                "cached_tokens": summary.cached_tokens,
                "prefilled_tokens": summary.prefilled_tokens,
                "generated_tokens": summary.generated_tokens,
                "time_to_first_token_s": round(summary.time_to_first_token_s, 4),
                "recompute_reason": summary.recompute_reason.value,
                "stored": summary.stored,
                "residency": summary.residency.value,
            },
        )


@dataclass
class WorkerServer:
    server: grpc.Server
    port: int
    servicer: WorkerServicer
    health: health.HealthServicer
    metrics: WorkerMetrics
    metrics_http: ThreadingHTTPServer | None
    cache_client: ShardedCacheClient | None
    settings: WorkerSettings

    @property
    def address(self) -> str:
        """host:port to dial (loopback when the worker listens on every interface)."""
        host, _ = split_address(self.settings.listen)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def generator(self) -> TurnGenerator | None:
        return self.servicer.generator

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_port if self.metrics_http else None

    def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, waiting turns refused, the running turn gets
        `grace_s` (default: the settings') to finish."""
        self.health.enter_graceful_shutdown()
        self.servicer.queue.close()
        self.server.stop(self.settings.grace_s if grace_s is None else grace_s).wait()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        if self.cache_client is not None:
            self.cache_client.close()


def _set_health(servicer: health.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        servicer.set(name, status)


def start_worker(settings: WorkerSettings, lm: LoadedModel | None = None) -> WorkerServer:
    """Build, bind and start a worker, then load its model (`lm`: one already loaded,
    shared as is; turns on one server still run one at a time)."""
    auth = TokenAuth(settings.token_tenants())
    metrics = WorkerMetrics()
    servicer = WorkerServicer(settings, auth)
    health_servicer = health.HealthServicer()
    _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(
        ThreadPoolExecutor(
            max_workers=settings.max_queue + 1 + SPARE_THREADS, thread_name_prefix="worker-rpc"
        ),
        interceptors=[SyncAuthInterceptor(auth)],
        options=[("grpc.so_reuseport", 0)],
    )
    add_service(server, SERVICE, servicer, RpcOutcomes(metrics, status_code_of, log))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(settings.tls_cert, settings.tls_key)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError as exc:
        raise SettingsError(f"{env_name('listen')}: cannot bind {settings.listen}: {exc}") from None
    if port == 0:
        raise SettingsError(f"{env_name('listen')}: cannot bind {settings.listen}")
    metrics_http = None
    cache_client = None
    server.start()
    try:
        if settings.metrics_listen:
            host, metrics_port = split_address(settings.metrics_listen)
            metrics_http = serve_metrics(metrics, host, metrics_port)
        if lm is None:
            log.info("loading the model", extra={"model": settings.model, "port": port})
            lm = load_model(settings.model)
        try:  # a default policy that does not fit the model stops start-up
            check_policy(servicer.default_policy, lm.shape)
        except ValueError as exc:
            raise SettingsError(f"{env_name('default_policy')}: {exc}") from None
        # One code path for any number of cache servers: one is a shard set of one.
        cache_configs = settings.cache_client_configs()
        cache_client = ShardedCacheClient(cache_configs) if cache_configs else None
        servicer.generator = TurnGenerator(
            lm,
            cache_client,
            model_id=settings.model_id or None,
            kv_dtype=settings.kv_dtype or None,
            metrics=metrics,
            stream_timeout_s=settings.cache_stream_timeout_s,
        )
    except BaseException:
        server.stop(0).wait()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        if cache_client is not None:
            cache_client.close()
        raise
    _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    if settings.insecure and (credentials is None or not auth.required):
        missing = [what for what, ok in (("TLS", credentials), ("tokens", auth.required)) if not ok]
        log.warning(
            "INSECURE MODE: %s off; anyone who reaches port %d can generate with this "
            "worker. For local development only.",
            " and ".join(missing),
            port,
        )
    generator = servicer.generator
    log.info(
        "worker ready on port %d",
        port,
        extra={
            "port": port,
            "model": lm.name,
            "model_id": generator.model_id,
            "kv_dtype": generator.kv_dtype,
            "cache_targets": list(settings.cache_target_list),
            "residency": settings.residency,
            "tls": credentials is not None,
            "tenants": len(set(auth.token_tenants.values())),
            "metrics_port": metrics_http.server_port if metrics_http else None,
        },
    )
    return WorkerServer(
        server,
        port,
        servicer,
        health_servicer,
        metrics,
        metrics_http,
        cache_client,
        settings,
    )
