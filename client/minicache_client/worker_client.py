"""`WorkerClient`: the client of an inference worker (`minicache.v1.WorkerService`).

A session's token history lives with the caller: every turn returns the tokens to add
to it (`TurnResult.turn_tokens`), and the next turn sends the whole history to any
worker, which restores its KV from the cache service. `Conversation` keeps that history
for you.

Deadlines: a whole generated turn on a CPU takes far longer than one cache call, so a
turn's deadline is `timeout_s` when given, else max(`config.timeout_s`, 300 s); the
default `ClientConfig.timeout_s` (10 s) applies only to `health()`. Failed calls raise
the typed errors of `minicache_client.errors` (INVALID_ARGUMENT: `InvalidArgumentError`,
a full worker queue: `ResourceExhaustedError`, a worker shutting down:
`UnavailableError`, ...), never a bare `grpc.RpcError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from minicache_client.cache_client import (
    check_timeout,
    health_stub,
    serving_status,
    typed_errors,
)
from minicache_client.channel import ChannelClient, ClientConfig
from minicache_client.errors import CacheError, InvalidArgumentError
from minicache_client.proto import worker_service_pb2 as pb
from minicache_client.proto import worker_service_pb2_grpc

# The least deadline of a turn when the call gives none (see the module docstring).
DEFAULT_TURN_TIMEOUT_S = 300.0

_RESIDENCY_TO_PROTO = {
    None: pb.RESIDENCY_UNSPECIFIED,
    "local": pb.RESIDENCY_LOCAL,
    "remote": pb.RESIDENCY_REMOTE,
}
_RESIDENCY_NAMES = {
    pb.RESIDENCY_UNSPECIFIED: "",
    pb.RESIDENCY_LOCAL: "local",
    pb.RESIDENCY_REMOTE: "remote",
}


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token; `text` may be an incomplete UTF-8 piece (shown as U+FFFD),
    and is empty for special tokens such as the end of a turn."""

    token_id: int
    text: str


@dataclass(frozen=True)
class TurnResult:
    """A finished turn.

    tokens: the generated token ids; text: their texts concatenated.
    turn_tokens: append these to the session's history for the next turn (the rendered
        user message, the raw new tokens and the generated ones).
    cached_tokens: history tokens whose KV came from the cache service (0: none).
    prefilled_tokens: tokens this turn ran through the model in its prefill.
    recompute_reason: why the history was recomputed instead of restored: "" (it was
        not), "miss", "unavailable", "corrupt", "mismatch".
    stored: the cache service holds every computed token of this turn's KV.
    residency: "local" or "remote".
    """

    tokens: tuple[int, ...]
    text: str
    turn_tokens: tuple[int, ...]
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    recompute_reason: str
    stored: bool
    residency: str

    @property
    def resumed(self) -> bool:
        """The history's KV came from the cache service, at least in part."""
        return self.cached_tokens > 0


def _turn_result(generated: list[GeneratedToken], summary: pb.TurnSummary) -> TurnResult:
    return TurnResult(
        tokens=tuple(token.token_id for token in generated),
        text="".join(token.text for token in generated),
        turn_tokens=tuple(summary.turn_tokens),
        cached_tokens=summary.cached_tokens,
        prefilled_tokens=summary.prefilled_tokens,
        generated_tokens=summary.generated_tokens,
        time_to_first_token_s=summary.time_to_first_token_s,
        decode_tokens_per_s=summary.decode_tokens_per_s,
        recompute_reason=summary.recompute_reason,
        stored=summary.stored,
        residency=_RESIDENCY_NAMES.get(summary.residency, ""),
    )


class WorkerClient(ChannelClient):
    """The synchronous client of one inference worker (`config.target`); close it, or
    use it as a context manager."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config)
        self._stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)

    def _turn_timeout(self, timeout_s: float | None) -> float:
        return check_timeout(timeout_s, max(self.config.timeout_s, DEFAULT_TURN_TIMEOUT_S))

    def generate(
        self,
        session_id: str,
        *,
        history_tokens: Sequence[int] = (),
        user_message: str = "",
        new_tokens: Sequence[int] = (),
        max_new_tokens: int,
        policy: str = "",
        residency: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[GeneratedToken | TurnResult]:
        """One turn: a `GeneratedToken` per token as the worker generates it, then the
        `TurnResult`. The call starts on the first `next()`; leaving the loop early
        cancels it.

        history_tokens: the session's tokens so far (every previous turn's
            `turn_tokens`); empty for the first turn.
        user_message: rendered with the model's chat template as a new user turn.
        new_tokens: raw token ids appended after the message.
        max_new_tokens: 1 to the worker's limit (4096 at most); generation stops early
            at an end-of-turn token.
        policy: the compression policy (preset name or JSON) when this turn writes the
            session from its first token; empty: the worker's default.
        residency: "local", "remote" or None (the worker's default).
        timeout_s: the turn's deadline; default max(config.timeout_s, 300).
        """
        if residency not in _RESIDENCY_TO_PROTO:
            raise InvalidArgumentError(
                f"residency must be 'local', 'remote' or None, got {residency!r}"
            )
        timeout = self._turn_timeout(timeout_s)
        try:
            request = pb.GenerateRequest(
                session_id=session_id,
                history_tokens=history_tokens,
                user_message=user_message,
                new_tokens=new_tokens,
                max_new_tokens=max_new_tokens,
                policy=policy,
                residency=_RESIDENCY_TO_PROTO[residency],
            )
        except (TypeError, ValueError) as exc:  # protobuf's range and type checks
            raise InvalidArgumentError(f"malformed turn request: {exc}") from None
        generated: list[GeneratedToken] = []
        with typed_errors():
            call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
            try:
                for response in call:
                    if response.HasField("summary"):
                        # Read to the end of the stream first: a worker takes a turn
                        # whose call is cancelled before it ends for one the caller
                        # never got, and drops its KV.
                        for _ in call:
                            pass
                        yield _turn_result(generated, response.summary)
                        return
                    token = GeneratedToken(response.token.token_id, response.token.text)
                    generated.append(token)
                    yield token
            finally:
                call.cancel()  # a no-op once the call has ended
        raise CacheError(f"the worker at {self.target} ended the turn without a summary")

    def turn(
        self,
        session_id: str,
        *,
        history_tokens: Sequence[int] = (),
        user_message: str = "",
        new_tokens: Sequence[int] = (),
        max_new_tokens: int,
        policy: str = "",
        residency: str | None = None,
        timeout_s: float | None = None,
    ) -> TurnResult:
        """`generate` run to its end: the turn's `TurnResult` (same arguments)."""
        for event in self.generate(
            session_id,
            history_tokens=history_tokens,
            user_message=user_message,
            new_tokens=new_tokens,
            max_new_tokens=max_new_tokens,
            policy=policy,
            residency=residency,
            timeout_s=timeout_s,
        ):
            if isinstance(event, TurnResult):
                return event
        raise CacheError(f"the worker at {self.target} ended the turn without a summary")

    def health(self, *, timeout_s: float | None = None) -> str:
        """The worker's status (grpc.health.v1): "SERVING" once its model is loaded,
        "NOT_SERVING" while it loads or drains. Deadline: `config.timeout_s`."""
        stub, health_pb2 = health_stub(self._channel)
        with typed_errors():
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=check_timeout(timeout_s, self.config.timeout_s),
                metadata=self._metadata,
            )
        return serving_status(health_pb2, response)


class Conversation:
    """A session on a worker whose history this object keeps: each `say` sends the
    history so far and appends the turn's `turn_tokens` to it.

    `history_tokens`: continue a session started elsewhere (another `Conversation`'s
    history, on any worker that shares the cache service). `client` may be swapped
    between turns: the next turn resumes from the cache service on the new worker.
    """

    def __init__(
        self,
        client: WorkerClient,
        session_id: str,
        *,
        policy: str = "",
        residency: str | None = None,
        history_tokens: Sequence[int] = (),
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.policy = policy
        self.residency = residency
        self.history_tokens: list[int] = list(history_tokens)

    def say(
        self,
        user_message: str,
        *,
        max_new_tokens: int = 128,
        new_tokens: Sequence[int] = (),
        timeout_s: float | None = None,
    ) -> TurnResult:
        """One turn: `user_message` as the next user turn; returns the reply. A failed
        turn leaves the history as it was."""
        result = self.client.turn(
            self.session_id,
            history_tokens=self.history_tokens,
            user_message=user_message,
            new_tokens=new_tokens,
            max_new_tokens=max_new_tokens,
            policy=self.policy,
            residency=self.residency,
            timeout_s=timeout_s,
        )
        self.history_tokens.extend(result.turn_tokens)
        return result
