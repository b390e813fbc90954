"""`ShardedCacheClient`: sequences spread over several cache servers.

Each (model_id, sequence_id) lives on one server, chosen by rendezvous
(highest-random-weight) hashing: every server scores the sequence with a stable hash
(BLAKE2b, the same in every process, unlike Python's `hash()`) and the highest score
wins. Adding a server moves only the sequences it now wins, about 1/n of them;
removing one moves only its own.

A cache is allowed to miss: a read (`prefetch`, `prefetch_layers`, `lookup`) whose server
is down or does not answer within the deadline raises `UnreachableServerError`, a
`NotFoundError` ("miss: server X is unavailable"), so the caller recomputes the KV
exactly as for a sequence never written; one that wants to tell the two apart (to count
outages) catches the subclass. Writes (`put`, `open_put`, `append`, `delete`) raise the
`UnavailableError` or `DeadlineExceededError` itself: the caller decides whether to go on
without the cache.

Calibration artifacts are addressed by their content, not placed: `get_artifact` asks
the servers one after another (the digest's rendezvous order) until one has the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from minicache_client.cache_client import CacheClient, PutStream
from minicache_client.channel import ClientConfig
from minicache_client.errors import (
    CacheError,
    DeadlineExceededError,
    NotFoundError,
    UnavailableError,
)
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_client.transform_artifact import ARTIFACTS, ArtifactRegistry

# Errors of a server that cannot answer: for a read, a cache miss.
UNREACHABLE = (UnavailableError, DeadlineExceededError)


class UnreachableServerError(NotFoundError):
    """A read whose server could not answer (down, or past the deadline): a miss, since
    the caller recomputes either way. `server` is its target; `cause` the
    `UnavailableError` or `DeadlineExceededError` of the call."""

    def __init__(self, server: str, cause: CacheError) -> None:
        super().__init__(f"miss: server {server} is unavailable ({cause})")
        self.server = server
        self.cause = cause


def _length_prefixed(*parts: str) -> bytes:
    # Unambiguous: ("a:b", "c") and ("a", "b:c") hash differently.
    encoded = [part.encode() for part in parts]
    return b"".join(len(part).to_bytes(4, "little") + part for part in encoded)


def rendezvous_score(server: str, model_id: str, sequence_id: str) -> int:
    """The weight of `server` for a sequence: 64 bits of BLAKE2b, stable everywhere."""
    digest = hashlib.blake2b(
        _length_prefixed(server, model_id, sequence_id), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def rendezvous_order(servers: Sequence[str], model_id: str, sequence_id: str) -> list[str]:
    """`servers` from the highest score for the sequence to the lowest: the first holds
    it; the rest are the order a content-addressed lookup falls back in."""
    return sorted(
        servers,
        key=lambda server: (rendezvous_score(server, model_id, sequence_id), server),
        reverse=True,
    )


def place_sequence(servers: Sequence[str], model_id: str, sequence_id: str) -> str:
    """The server among `servers` that holds the sequence (the highest score)."""
    if not servers:
        raise ValueError("no servers to place the sequence on")
    return rendezvous_order(servers, model_id, sequence_id)[0]


class ShardedCacheClient:
    """`CacheClient` calls, each routed to the server of its sequence.

    `configs`: one `ClientConfig` per server, with distinct targets; a server is named
    by its target. Tensor shapes are those of `CacheClient`.
    """

    def __init__(self, configs: Sequence[ClientConfig]) -> None:
        if not configs:
            raise ValueError("configs must name at least one server")
        targets = [config.target for config in configs]
        duplicates = sorted({target for target in targets if targets.count(target) > 1})
        if duplicates:
            raise ValueError(f"configs name the same server more than once: {duplicates}")
        self.servers = tuple(targets)
        self._clients: dict[str, CacheClient] = {}
        # The registry that fetches through this client (`use_for_artifacts`).
        self._artifact_registry: ArtifactRegistry | None = None
        try:
            for config in configs:
                self._clients[config.target] = CacheClient(config)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every server's channel; a registry that fetched through this client
        stops."""
        registry, self._artifact_registry = self._artifact_registry, None
        if registry is not None and registry.fetch == self.get_artifact:
            registry.fetch = None
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> ShardedCacheClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def server_for(self, model_id: str, sequence_id: str) -> str:
        """The target of the server that holds the sequence."""
        return place_sequence(self.servers, model_id, sequence_id)

    def client_for(self, model_id: str, sequence_id: str) -> CacheClient:
        return self._clients[self.server_for(model_id, sequence_id)]

    def put(self, model_id: str, sequence_id: str, layers: Any, **put_args: Any) -> PutResult:
        """`CacheClient.put` on the sequence's server."""
        return self.client_for(model_id, sequence_id).put(model_id, sequence_id, layers, **put_args)

    def open_put(self, model_id: str, sequence_id: str, **open_args: Any) -> PutStream:
        """`CacheClient.open_put` on the sequence's server."""
        return self.client_for(model_id, sequence_id).open_put(model_id, sequence_id, **open_args)

    def append(self, model_id: str, sequence_id: str, layers: Any, **append_args: Any) -> PutResult:
        """`CacheClient.append` on the sequence's server."""
        return self.client_for(model_id, sequence_id).append(
            model_id, sequence_id, layers, **append_args
        )

    def delete(self, model_id: str, sequence_id: str, **call_args: Any) -> bool:
        """`CacheClient.delete` on the sequence's server."""
        return self.client_for(model_id, sequence_id).delete(model_id, sequence_id, **call_args)

    def prefetch(
        self, model_id: str, sequence_id: str, **prefetch_args: Any
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """`CacheClient.prefetch` on the sequence's server; an unreachable server is a
        miss (NotFoundError), also when it fails part way through the stream."""
        server = self.server_for(model_id, sequence_id)
        try:
            layers = self._clients[server].prefetch(model_id, sequence_id, **prefetch_args)
        except UNREACHABLE as exc:
            raise UnreachableServerError(server, exc) from exc
        return self._missing_when_unreachable(server, layers)

    def _missing_when_unreachable(
        self, server: str, layers: Iterator[tuple[int, np.ndarray, np.ndarray]]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        try:
            yield from layers
        except UNREACHABLE as exc:
            raise UnreachableServerError(server, exc) from exc

    def prefetch_layers(
        self, model_id: str, sequence_id: str, **prefetch_args: Any
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) of every requested layer, in order; a miss as in `prefetch`."""
        return [
            (keys, values)
            for _, keys, values in self.prefetch(model_id, sequence_id, **prefetch_args)
        ]

    def lookup(self, model_id: str, sequence_id: str, **call_args: Any) -> LookupResult:
        """`CacheClient.lookup` on the sequence's server; unreachable is a miss."""
        server = self.server_for(model_id, sequence_id)
        try:
            return self._clients[server].lookup(model_id, sequence_id, **call_args)
        except UNREACHABLE as exc:
            raise UnreachableServerError(server, exc) from exc

    def stats(self, **call_args: Any) -> dict[str, StatsResult]:
        """Each server's stats of the caller's tenant, by target; raises the error of
        the first server that cannot answer."""
        return {server: client.stats(**call_args) for server, client in self._clients.items()}

    def health(self, **call_args: Any) -> dict[str, str]:
        """Each server's status by target: "SERVING", "NOT_SERVING", or "UNAVAILABLE"
        for one that cannot be reached within the deadline."""
        statuses = {}
        for server, client in self._clients.items():
            try:
                statuses[server] = client.health(**call_args)
            except UNREACHABLE:
                statuses[server] = "UNAVAILABLE"
        return statuses

    def get_artifact(self, digest: str, **call_args: Any) -> bytes:
        """`CacheClient.get_artifact` from the first server, in the digest's rendezvous
        order, that holds the file: one that lacks it or cannot answer passes to the
        next. NotFoundError when none of them has it (saying how many could not
        answer); a malformed hash or a corrupt file raises at once."""
        unreachable: list[str] = []
        for server in rendezvous_order(self.servers, "", digest):
            try:
                return self._clients[server].get_artifact(digest, **call_args)
            except UNREACHABLE:
                unreachable.append(server)
            except NotFoundError:
                continue
        cannot_answer = f"; {', '.join(unreachable)} could not answer" if unreachable else ""
        raise NotFoundError(
            f"no cache server holds the artifact {digest}"
            f" ({len(self.servers)} asked{cannot_answer})"
        )

    def use_for_artifacts(self, registry: ArtifactRegistry = ARTIFACTS) -> None:
        """As `CacheClient.use_for_artifacts`: `registry` (default: the process's)
        fetches the artifacts it lacks through `get_artifact`, until `close()`."""
        registry.fetch = self.get_artifact
        self._artifact_registry = registry
