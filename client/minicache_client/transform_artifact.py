"""Calibration artifacts of the transform codec: what `minicache-worker calibrate
--transform` fits for one model, as a versioned, checksummed file addressed by the
SHA-256 of its bytes.

An artifact holds, per layer group and side (keys, values): a mean and an orthonormal
basis (principal components of calibration KV, keys with RoPE undone), one uniform
quantization step, and the Laplace scale of each kept component (the entropy coder's
tables); per layer, the model's RoPE table; and the calibration's measured cost. A
policy names its artifact by hash (`TransformPlan.artifact`); every process that
encodes or restores it looks the hash up in an `ArtifactRegistry`.

File format (version 1):

    b"MCTA" | version u8 | 3 zero bytes | xxh3-64 of the payload (u64 LE) | payload

The payload is msgpack; an array is `{"dtype", "shape", "data"}`. The hash is
`sha256(file)`, hex: the name of the file in an artifact directory is `<hash>.mcta`.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import xxhash

from minicache_client.entropy import CODERS
from minicache_client.policy import ARTIFACT_HASH, ModelShape
from minicache_client.rope import RopeTable

ARTIFACT_MAGIC = b"MCTA"
ARTIFACT_VERSION = 1
ARTIFACT_SUFFIX = ".mcta"
_HEADER = struct.Struct("<4sB3xQ")
HASH_PATTERN = ARTIFACT_HASH
BUNDLED_DIRECTORY = Path(__file__).with_name("artifacts")
# Artifact files are small next to a model (megabytes); a larger one is refused before
# it is read.
MAX_ARTIFACT_BYTES = 256 << 20


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or does not fit what uses it."""


class MissingArtifactError(ArtifactError):
    def __init__(self, digest: str) -> None:
        super().__init__(
            f"calibration artifact {digest} is not available here: put {digest}"
            f"{ARTIFACT_SUFFIX} in an artifact directory (or fetch it from a cache server)"
        )
        self.digest = digest


class CorruptArtifactError(ArtifactError):
    pass


def check_digest(digest: Any) -> str:
    if not isinstance(digest, str) or not HASH_PATTERN.fullmatch(digest):
        raise ArtifactError(
            f"an artifact hash is 64 lowercase hex digits (SHA-256), got {str(digest)[:80]!r}"
        )
    return digest


@dataclass(frozen=True)
class SideTransform:
    """One side of one layer group: `x ≈ mean + (codes * step) @ basis.T`, where x is
    a token's vector over the group's layers, heads and channels (keys with RoPE
    undone)."""

    mean: np.ndarray  # float32 [dim]
    basis: np.ndarray  # float32 [dim, rank], orthonormal columns
    step: float
    scales: np.ndarray  # float32 [rank]: Laplace scale of each component's codes

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


@dataclass(frozen=True)
class GroupTransform:
    layers: tuple[int, ...]
    keys: SideTransform
    values: SideTransform

    def side(self, kind: str) -> SideTransform:
        return self.keys if kind == "keys" else self.values


@dataclass(frozen=True)
class TransformArtifact:
    model: str
    shape: ModelShape
    rope: tuple[RopeTable, ...]  # one per layer
    groups: tuple[GroupTransform, ...]
    coder: str = "rans"
    # What calibration measured (settings, costs): plain values, shown in reports.
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.coder not in CODERS:
            raise ArtifactError(f"coder must be one of {CODERS}, got {self.coder!r}")
        if len(self.rope) != self.shape.num_layers:
            raise ArtifactError("an artifact needs one RoPE table per layer")
        dim = self.shape.kv_heads * self.shape.head_dim
        seen: set[int] = set()
        for group in self.groups:
            layers = group.layers
            if (
                not layers
                or len(set(layers)) != len(layers)
                or seen & set(layers)
                or not 0 <= min(layers) <= max(layers) < self.shape.num_layers
            ):
                raise ArtifactError(f"artifact group {layers} overlaps or is out of range")
            seen |= set(layers)
            for side in (group.keys, group.values):
                width = dim * len(layers)
                if (
                    side.mean.shape != (width,)
                    or side.basis.ndim != 2
                    or side.basis.shape[0] != width
                    or side.scales.shape != (side.basis.shape[1],)
                    or not (np.isfinite(side.step) and side.step > 0)
                ):
                    raise ArtifactError(f"artifact group {layers} has inconsistent arrays")

    def group_for(self, layers: Iterable[int]) -> tuple[int, GroupTransform]:
        layers = tuple(layers)
        for index, group in enumerate(self.groups):
            if group.layers == layers:
                return index, group
        raise ArtifactError(f"the artifact has no transform for layers {layers}")


# -- file format ----------------------------------------------------------------------


def _array_to_plain(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def _array_from_plain(plain: Any) -> np.ndarray:
    if not isinstance(plain, dict) or set(plain) != {"dtype", "shape", "data"}:
        raise CorruptArtifactError("artifact array is malformed")
    try:
        dtype = np.dtype(plain["dtype"])
        shape = tuple(int(n) for n in plain["shape"])
        if dtype.kind != "f" or min(shape, default=0) < 0:
            raise ValueError("not a float array")
        array = np.frombuffer(plain["data"], dtype=dtype).reshape(shape)
    except (TypeError, ValueError) as exc:
        raise CorruptArtifactError(f"artifact array is malformed: {exc}") from None
    if not np.isfinite(array).all():
        raise CorruptArtifactError("artifact array holds NaN or Inf")
    return array.astype(np.float32)


def _side_to_plain(side: SideTransform) -> dict[str, Any]:
    return {
        "mean": _array_to_plain(side.mean.astype(np.float32)),
        # float16 halves the file; the basis is used as float32.
        "basis": _array_to_plain(side.basis.astype(np.float16)),
        "step": float(side.step),
        "scales": _array_to_plain(side.scales.astype(np.float32)),
    }


def _side_from_plain(plain: dict[str, Any]) -> SideTransform:
    return SideTransform(
        mean=_array_from_plain(plain["mean"]),
        basis=_array_from_plain(plain["basis"]),
        step=float(plain["step"]),
        scales=_array_from_plain(plain["scales"]),
    )


def encode_artifact(artifact: TransformArtifact) -> bytes:
    payload = msgpack.packb(
        {
            "model": artifact.model,
            "shape": [artifact.shape.num_layers, artifact.shape.kv_heads, artifact.shape.head_dim],
            "rope": [
                {
                    "inv_freq": _array_to_plain(table.inv_freq),
                    "attention_scaling": float(table.attention_scaling),
                }
                for table in artifact.rope
            ],
            "groups": [
                {
                    "layers": list(group.layers),
                    "keys": _side_to_plain(group.keys),
                    "values": _side_to_plain(group.values),
                }
                for group in artifact.groups
            ],
            "coder": artifact.coder,
            "calibration": artifact.calibration,
        },
        use_bin_type=True,
    )
    header = _HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, xxhash.xxh3_64_intdigest(payload))
    return header + payload


def artifact_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_artifact(data: bytes, digest: str | None = None) -> TransformArtifact:
    """Verify and decode an artifact file; `digest`: the hash it must have."""
    if digest is not None and artifact_digest(data) != digest:
        raise CorruptArtifactError(f"artifact {digest} does not hash to its name")
    if len(data) < _HEADER.size:
        raise CorruptArtifactError("artifact is shorter than its header")
    magic, version, checksum = _HEADER.unpack_from(data)
    if magic != ARTIFACT_MAGIC:
        raise CorruptArtifactError("not a MiniCache calibration artifact (bad magic)")
    if version != ARTIFACT_VERSION:
        raise CorruptArtifactError(
            f"artifact format version {version} is not supported (this build reads "
            f"version {ARTIFACT_VERSION}): calibrate again with this release"
        )
    if bytes(data[5:8]) != bytes(3):
        raise CorruptArtifactError("artifact header's reserved bytes are not zero")
    payload = memoryview(data)[_HEADER.size :]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise CorruptArtifactError("artifact checksum mismatch")
    try:
        plain = msgpack.unpackb(payload, raw=False)
        return TransformArtifact(
            model=str(plain["model"]),
            shape=ModelShape(*plain["shape"]),
            rope=tuple(
                RopeTable(_array_from_plain(t["inv_freq"]), float(t["attention_scaling"]))
                for t in plain["rope"]
            ),
            groups=tuple(
                GroupTransform(
                    tuple(int(layer) for layer in g["layers"]),
                    _side_from_plain(g["keys"]),
                    _side_from_plain(g["values"]),
                )
                for g in plain["groups"]
            ),
            coder=plain["coder"],
            calibration=dict(plain["calibration"]),
        )
    except CorruptArtifactError:
        raise
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise CorruptArtifactError(f"artifact is malformed: {exc}") from None


# -- where artifacts are found ----------------------------------------------------------


class ArtifactRegistry:
    """Artifacts by hash: held in memory once loaded, found in `directories` (files
    named `<hash>.mcta`), or asked of `fetch` (a callable hash -> file bytes, such as a
    cache client's `get_artifact`), which are then written to the first directory
    that can be written."""

    def __init__(
        self,
        directories: Iterable[str | os.PathLike] = (),
        fetch: Callable[[str], bytes] | None = None,
    ) -> None:
        self.directories = [Path(d) for d in directories]
        self.fetch = fetch
        self._loaded: dict[str, tuple[bytes, TransformArtifact]] = {}
        self._lock = threading.Lock()

    def add_directory(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        if path not in self.directories:
            self.directories.insert(0, path)

    def add(self, data: bytes, persist: bool = False, digest: str | None = None) -> str:
        """Verify and hold an artifact; its hash. `digest`: the hash it must have (a
        file's name, a fetched hash): CorruptArtifactError otherwise. `persist`: also
        write it to the first writable directory."""
        digest = digest or artifact_digest(data)
        artifact = decode_artifact(data, digest)
        with self._lock:
            self._loaded[digest] = (bytes(data), artifact)
        if persist:
            self._persist(digest, data)
        return digest

    def _persist(self, digest: str, data: bytes) -> None:
        for directory in self.directories:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                partial = directory / f".{digest}.{os.getpid()}.partial"
                partial.write_bytes(data)
                os.replace(partial, directory / f"{digest}{ARTIFACT_SUFFIX}")
                return
            except OSError:
                continue

    def _load(self, digest: str) -> tuple[bytes, TransformArtifact]:
        check_digest(digest)
        with self._lock:
            held = self._loaded.get(digest)
        if held is not None:
            return held
        for directory in self.directories:
            path = directory / f"{digest}{ARTIFACT_SUFFIX}"
            try:
                if path.stat().st_size > MAX_ARTIFACT_BYTES:
                    raise CorruptArtifactError(f"artifact file {path} is too large")
                data = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):  # not there
                continue
            except OSError as exc:
                raise ArtifactError(f"cannot read artifact {path}: {exc}") from None
            self.add(data, digest=digest)
            return self._loaded[digest]
        if self.fetch is not None:
            data = self.fetch(digest)
            self.add(data, persist=True, digest=digest)
            return self._loaded[digest]
        raise MissingArtifactError(digest)

    def get(self, digest: str) -> TransformArtifact:
        """The artifact of `digest`: MissingArtifactError when no directory holds it,
        CorruptArtifactError when its file fails verification."""
        return self._load(digest)[1]

    def data(self, digest: str) -> bytes:
        """The artifact's file bytes (what the artifact RPC sends)."""
        return self._load(digest)[0]

    def has(self, digest: str) -> bool:
        try:
            self._load(digest)
        except MissingArtifactError:
            return False
        return True


def _default_directories() -> list[Path]:
    directories = [Path(p) for p in os.environ.get("MINICACHE_ARTIFACT_DIRS", "").split(":") if p]
    directories.append(Path.home() / ".cache" / "minicache" / "artifacts")
    directories.append(BUNDLED_DIRECTORY)
    return directories


ARTIFACTS = ArtifactRegistry(_default_directories())
"""The process's registry: `MINICACHE_ARTIFACT_DIRS` (colon-separated), the user's
cache directory, then the artifacts bundled with the SDK. Codecs look hashes up here."""
