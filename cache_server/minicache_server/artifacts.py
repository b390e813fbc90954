"""The calibration artifacts of transform policies, as the cache server uses them.

The codecs look artifacts up by hash in the process's registry
(`minicache_client.transform_artifact.ARTIFACTS`); the server adds its artifact
directory (`MINICACHE_ARTIFACT_DIR`) to it at start (`use_directory`). An artifact is
read and verified when first used, then held in memory; a file that fails verification
is read again at its next use, so replacing it needs no restart.

Every artifact problem the server meets becomes a domain error (`refusal`):

- a policy whose artifact the server lacks, or holds corrupt (the file does not hash to
  its name, or fails its checksum) or cannot read: FAILED_PRECONDITION, the hash in the
  details. The request is well formed; the server's artifact directory is not in the
  state it needs, and an operator fixes it (DATA_LOSS stays for stored KV);
- an artifact that does not fit the model of the request (other KV heads or head size,
  no transform for a group of the policy): INVALID_ARGUMENT, like any other policy that
  does not fit its model (`check_policy`);
- GetArtifact (`artifact_bytes`): a malformed hash is INVALID_ARGUMENT, one the server
  holds no file of is NOT_FOUND, a corrupt file FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from minicache_client.errors import (
    CacheError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    clipped,
)
from minicache_client.policy import CompressionPolicy, ModelShape
from minicache_client.transform_artifact import (
    ARTIFACT_SUFFIX,
    ARTIFACTS,
    HASH_PATTERN,
    ArtifactError,
    ArtifactRegistry,
    CorruptArtifactError,
    MissingArtifactError,
    TransformArtifact,
    check_digest,
)

log = logging.getLogger(__name__)

_reported_corrupt: set[str] = set()


def refusal(error: ArtifactError, digest: str | None = None) -> CacheError:
    """The domain error answering an artifact problem (see the module docstring);
    `digest`: the hash that was looked up, when the error does not say it."""
    digest = getattr(error, "digest", None) or digest
    if isinstance(error, MissingArtifactError):
        return FailedPreconditionError(
            f"calibration artifact {digest} is not held by this server: put {digest}"
            f"{ARTIFACT_SUFFIX} in its artifact directory (MINICACHE_ARTIFACT_DIR)"
        )
    detail = clipped(str(error), 160)
    if isinstance(error, CorruptArtifactError):
        if digest is not None and digest not in _reported_corrupt:
            _reported_corrupt.add(digest)
            log.warning(
                "calibration artifact is corrupt", extra={"digest": digest, "error": detail}
            )
        named = f"calibration artifact {digest}" if digest else "a calibration artifact"
        return FailedPreconditionError(
            f"{named} on this server is corrupt ({detail}): replace its file"
        )
    named = f"calibration artifact {digest}" if digest else "calibration artifact"
    return FailedPreconditionError(f"{named}: {detail}")


def require(digest: str, registry: ArtifactRegistry = ARTIFACTS) -> TransformArtifact:
    """The artifact of `digest`, verified; FailedPreconditionError naming the hash when
    the server lacks it or holds it corrupt."""
    try:
        return registry.get(digest)
    except ArtifactError as exc:
        raise refusal(exc, digest) from None


def check_policy(
    policy: CompressionPolicy, shape: ModelShape, registry: ArtifactRegistry = ARTIFACTS
) -> None:
    """Refuse a policy whose artifact the server lacks or holds corrupt
    (FailedPreconditionError), or whose artifact does not fit a model of `shape`
    (InvalidArgumentError). Policies without a transform pass untouched."""
    plan = policy.transform
    if plan is None:
        return
    artifact = require(plan.artifact, registry)
    held = artifact.shape
    if (held.kv_heads, held.head_dim) != (shape.kv_heads, shape.head_dim):
        raise InvalidArgumentError(
            f"policy: calibration artifact {plan.artifact} is for {held.kv_heads} KV heads x "
            f"{held.head_dim} dims, not {shape.kv_heads} x {shape.head_dim}"
        )
    for group in plan.groups:
        try:
            artifact.group_for(group)
        except ArtifactError:
            raise InvalidArgumentError(
                f"policy: calibration artifact {plan.artifact} has no transform for layers "
                f"{tuple(group)}"
            ) from None


async def preload(policy: CompressionPolicy, registry: ArtifactRegistry = ARTIFACTS) -> None:
    """Read and verify the policy's artifact on a thread (a file of tens of MB), so
    that `check_policy` on the event loop finds it in memory. Errors are left to
    `check_policy`."""
    plan = policy.transform
    if plan is not None:
        with contextlib.suppress(ArtifactError):
            await asyncio.to_thread(registry.get, plan.artifact)


async def artifact_bytes(digest: str, registry: ArtifactRegistry = ARTIFACTS) -> bytes:
    """The file of `digest`, verified (GetArtifact); see the module docstring."""
    try:
        check_digest(digest)
    except ArtifactError as exc:
        raise InvalidArgumentError(str(exc)) from None
    try:
        return await asyncio.to_thread(registry.data, digest)
    except MissingArtifactError:
        raise NotFoundError(f"calibration artifact {digest} is not held by this server") from None
    except ArtifactError as exc:
        raise refusal(exc, digest) from None


def held_digests(registry: ArtifactRegistry = ARTIFACTS) -> set[str]:
    """The hashes of the artifact files in the registry's directories (named
    `<hash>.mcta`; not read, not verified)."""
    digests = set()
    for directory in registry.directories:
        try:
            for path in Path(directory).glob(f"*{ARTIFACT_SUFFIX}"):
                digest = path.name[: -len(ARTIFACT_SUFFIX)]
                if HASH_PATTERN.fullmatch(digest):
                    digests.add(digest)
        except OSError:
            continue
    return digests


def use_directory(directory: str, registry: ArtifactRegistry = ARTIFACTS) -> Path | None:
    """Add the server's artifact directory in front of the registry's; the path when
    this added it (to take it away at stop: `forget_directory`), else None. Logs how many
    artifacts the directories hold."""
    added = None
    if directory:
        path = Path(directory)
        if path not in registry.directories:
            registry.add_directory(path)
            added = path
    log.info(
        "calibration artifacts",
        extra={
            "artifact_dir": directory or None,
            "artifacts": len(held_digests(registry)),
            "directories": ":".join(str(d) for d in registry.directories),
        },
    )
    return added


def forget_directory(path: Path | None, registry: ArtifactRegistry = ARTIFACTS) -> None:
    """Undo `use_directory` (a server stopped inside a process that goes on: tests)."""
    if path is not None and path in registry.directories:
        registry.directories.remove(path)
