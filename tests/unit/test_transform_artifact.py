"""Calibration artifacts (`minicache_client.transform_artifact`): the versioned,
checksummed file format, addressed by the SHA-256 of its bytes, and the registry that
finds artifacts in memory, in directories (`<hash>.mcta`) or through a `fetch`
callable (persisting what it fetched).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
from transform_samples import sample_artifact

from minicache_client import transform_artifact
from minicache_client.policy import ModelShape
from minicache_client.rope import RopeTable
from minicache_client.transform_artifact import (
    ARTIFACT_MAGIC,
    ARTIFACT_SUFFIX,
    ARTIFACT_VERSION,
    ArtifactError,
    ArtifactRegistry,
    CorruptArtifactError,
    GroupTransform,
    MissingArtifactError,
    SideTransform,
    TransformArtifact,
    artifact_digest,
    check_digest,
    decode_artifact,
    encode_artifact,
)

HEADER = struct.Struct("<4sB3xQ")


def side(rng: np.random.Generator, dim: int, rank: int, step: float) -> SideTransform:
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:, :rank].astype(np.float32)
    return SideTransform(
        mean=rng.standard_normal(dim).astype(np.float32),
        basis=basis,
        step=step,
        scales=rng.uniform(0.01, 9, rank).astype(np.float32),
    )


def built_artifact(coder: str = "rans") -> TransformArtifact:
    rng = np.random.default_rng(1)
    heads, dim = 2, 8
    return TransformArtifact(
        model="org/model@main",
        shape=ModelShape(5, heads, dim),
        rope=tuple(
            RopeTable(rng.uniform(0.001, 1, dim // 2 - (layer % 2)), 1.0 + 0.1 * layer)
            for layer in range(5)
        ),
        groups=(
            GroupTransform((0, 1), side(rng, 32, 20, 0.3), side(rng, 32, 7, 0.9)),
            GroupTransform((2, 3, 4), side(rng, 48, 48, 0.25), side(rng, 48, 1, 1.5)),
        ),
        coder=coder,
        calibration={"kl": 0.012, "groups": [2, 3], "text": "wikitext", "nested": {"a": 1}},
    )


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, str]:
    data = encode_artifact(built_artifact())
    return data, artifact_digest(data)


# -- the file format ------------------------------------------------------------------------


@pytest.mark.parametrize("coder", ["rans", "zlib"])
def test_encode_decode_round_trip(coder: str) -> None:
    artifact = built_artifact(coder)
    data = encode_artifact(artifact)
    assert data[:4] == ARTIFACT_MAGIC and data[4] == ARTIFACT_VERSION and data[5:8] == bytes(3)
    decoded = decode_artifact(data, artifact_digest(data))
    assert (decoded.model, decoded.shape, decoded.coder) == (artifact.model, artifact.shape, coder)
    assert decoded.calibration == artifact.calibration
    for got, want in zip(decoded.rope, artifact.rope, strict=True):
        np.testing.assert_array_equal(got.inv_freq, want.inv_freq)
        assert got.attention_scaling == want.attention_scaling
    for got, want in zip(decoded.groups, artifact.groups, strict=True):
        assert got.layers == want.layers
        for kind in ("keys", "values"):
            a, b = got.side(kind), want.side(kind)
            assert a.step == b.step and a.rank == b.rank
            np.testing.assert_array_equal(a.mean, b.mean)
            np.testing.assert_array_equal(a.scales, b.scales)
            # The basis is stored in float16 and used as float32.
            assert a.basis.dtype == np.float32
            np.testing.assert_array_equal(a.basis, b.basis.astype(np.float16).astype(np.float32))
    # Deterministic, and nothing stored is lost: the decoded artifact encodes the same.
    assert encode_artifact(decoded) == data
    assert encode_artifact(built_artifact(coder)) == data
    assert decoded.group_for((2, 3, 4)) == (1, decoded.groups[1])
    with pytest.raises(ArtifactError, match="no transform for layers"):
        decoded.group_for((1, 2))


def test_the_hash_is_the_sha256_of_the_file(sample: tuple[bytes, str]) -> None:
    data, digest = sample
    assert digest == hashlib.sha256(data).hexdigest() == check_digest(digest)
    decode_artifact(data, digest)
    other = artifact_digest(data + b"\x00")
    with pytest.raises(CorruptArtifactError, match="does not hash to its name"):
        decode_artifact(data, other)


def test_a_foreign_or_future_file_is_refused(sample: tuple[bytes, str]) -> None:
    data, _ = sample
    with pytest.raises(CorruptArtifactError, match="magic"):
        decode_artifact(b"MCKV" + data[4:])
    for version in (0, ARTIFACT_VERSION + 1, 255):
        with pytest.raises(CorruptArtifactError, match=f"version {version} is not supported"):
            decode_artifact(data[:4] + bytes([version]) + data[5:])
    for length in (0, 3, 4, 15, 16):
        with pytest.raises(CorruptArtifactError):
            decode_artifact(data[:length])


def test_every_flipped_byte_is_refused(sample: tuple[bytes, str]) -> None:
    data, _ = sample
    for position in range(len(data)):
        for flip in (0x01, 0x80):
            corrupted = bytearray(data)
            corrupted[position] ^= flip
            with pytest.raises(CorruptArtifactError):
                decode_artifact(bytes(corrupted))
            if position >= HEADER.size:
                with pytest.raises(CorruptArtifactError, match="checksum"):
                    decode_artifact(bytes(corrupted))
    with pytest.raises(CorruptArtifactError):
        decode_artifact(data + b"\x00")


def repacked(data: bytes, change: Callable[[dict], None]) -> bytes:
    """`data` with its payload changed by `change`, under a valid checksum."""
    payload = msgpack.unpackb(data[HEADER.size :], raw=False)
    change(payload)
    packed = msgpack.packb(payload, use_bin_type=True)
    return HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, xxhash.xxh3_64_intdigest(packed)) + packed


def setter(*path: Any, value: Any) -> Callable[[dict], None]:
    def change(payload: dict) -> None:
        container = payload
        for key in path[:-1]:
            container = container[key]
        container[path[-1]] = value

    return change


def array(values: Any, dtype: str = "<f4") -> dict[str, Any]:
    values = np.asarray(values, dtype=dtype)
    return {"dtype": values.dtype.str, "shape": list(values.shape), "data": values.tobytes()}


MALFORMED = {
    "not a mapping": lambda payload: payload.clear() or payload.update({0: 1}),
    "no model": lambda payload: payload.pop("model"),
    "no groups": lambda payload: payload.pop("groups"),
    "groups not a list": setter("groups", value=7),
    "shape of two numbers": setter("shape", value=[5, 2]),
    "shape with a zero": setter("shape", value=[5, 0, 8]),
    "shape of another size": setter("shape", value=[5, 2, 16]),
    "one layer more": setter("shape", 0, value=6),
    "coder unknown": setter("coder", value="huffman"),
    "calibration not a mapping": setter("calibration", value=[1, 2]),
    "rope table missing": lambda payload: payload["rope"].pop(),
    "rope inv_freq 2-D": setter("rope", 0, "inv_freq", value=array([[0.1, 0.2]])),
    "rope inv_freq empty": setter("rope", 0, "inv_freq", value=array([])),
    "rope inv_freq NaN": setter("rope", 0, "inv_freq", value=array([0.1, np.nan])),
    "rope scaling negative": setter("rope", 1, "attention_scaling", value=-1.0),
    "rope scaling a word": setter("rope", 1, "attention_scaling", value="one"),
    "array of ints": setter("rope", 0, "inv_freq", value=array([1, 2], "<i4")),
    "array of objects": setter(
        "rope", 0, "inv_freq", value={"dtype": "|O", "shape": [1], "data": b"12345678"}
    ),
    "array with a key too many": setter("rope", 0, "inv_freq", value={**array([0.1]), "extra": 1}),
    "array shorter than its shape": setter(
        "rope", 0, "inv_freq", value={**array([0.1, 0.2]), "shape": [3]}
    ),
    "array of a negative shape": setter(
        "rope", 0, "inv_freq", value={**array([0.1, 0.2]), "shape": [-2]}
    ),
    "mean of infinities": setter("groups", 0, "keys", "mean", value=array([np.inf] * 32)),
    "mean one short": setter("groups", 0, "keys", "mean", value=array([0.0] * 31)),
    "basis of another width": setter("groups", 0, "values", "basis", value=array(np.eye(31, 7))),
    "basis 1-D": setter("groups", 0, "values", "basis", value=array(np.ones(32))),
    "scales of another rank": setter("groups", 0, "values", "scales", value=array([1.0] * 6)),
    "step zero": setter("groups", 1, "keys", "step", value=0.0),
    "step negative": setter("groups", 1, "keys", "step", value=-0.5),
    "step NaN": setter("groups", 1, "keys", "step", value=float("nan")),
    "step missing": lambda payload: payload["groups"][1]["keys"].pop("step"),
    "side not a mapping": setter("groups", 1, "values", value=[1, 2, 3]),
    "groups overlap": setter("groups", 1, "layers", value=[1, 2, 3]),
    "group past the last layer": setter("groups", 1, "layers", value=[3, 4, 5]),
    "group of a negative layer": setter("groups", 0, "layers", value=[-1, 0]),
    "group naming a layer twice": setter("groups", 0, "layers", value=[0, 0]),
    "group of no layer": setter("groups", 0, "layers", value=[]),
    "group layer a word": setter("groups", 0, "layers", value=["zero", "one"]),
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_a_malformed_payload_under_a_valid_checksum_is_corrupt(
    sample: tuple[bytes, str], what: str
) -> None:
    data = repacked(sample[0], MALFORMED[what])
    with pytest.raises(CorruptArtifactError):
        decode_artifact(data)
        pytest.fail(f"{what}: decoded")


def test_repacking_unchanged_is_the_same_file(sample: tuple[bytes, str]) -> None:
    assert repacked(sample[0], lambda payload: None) == sample[0]


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "g" * 64,
        " " + "0" * 63,
        "0" * 63 + "\n",
        None,
        7,
        b"0" * 64,
    ],
)
def test_a_malformed_hash_is_refused(digest: Any, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        check_digest(digest)
    registry = ArtifactRegistry([tmp_path], fetch=lambda _: pytest.fail("fetched"))
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        registry.get(digest)


# -- the registry ---------------------------------------------------------------------------


def test_a_missing_artifact_is_named_by_its_hash(tmp_path: Path, sample: tuple[bytes, str]) -> None:
    _, digest = sample
    registry = ArtifactRegistry([tmp_path / "none", tmp_path])
    with pytest.raises(MissingArtifactError, match=digest) as raised:
        registry.get(digest)
    assert raised.value.digest == digest
    assert f"{digest}{ARTIFACT_SUFFIX}" in str(raised.value)
    assert isinstance(raised.value, ArtifactError) and isinstance(raised.value, ValueError)
    assert not registry.has(digest)
    with pytest.raises(MissingArtifactError):
        registry.data(digest)


def test_files_in_a_directory_are_found_and_held(tmp_path: Path, sample: tuple[bytes, str]) -> None:
    data, digest = sample
    first, second = tmp_path / "first", tmp_path / "second"
    second.mkdir()
    (second / f"{digest}{ARTIFACT_SUFFIX}").write_bytes(data)
    registry = ArtifactRegistry([first, second])
    assert registry.has(digest)
    assert registry.data(digest) == data
    artifact = registry.get(digest)
    assert artifact.model == "org/model@main"
    # Held in memory: the file may go.
    (second / f"{digest}{ARTIFACT_SUFFIX}").unlink()
    assert registry.get(digest) is artifact
    assert registry.data(digest) == data
    assert not first.exists()  # looking does not create directories


def test_an_added_directory_is_searched_first(tmp_path: Path) -> None:
    data, digest = sample_artifact(seed=91)
    late, early = tmp_path / "late", tmp_path / "early"
    for directory in (late, early):
        directory.mkdir()
    # A file under the right name in the added directory, a corrupt one in the other.
    (early / f"{digest}{ARTIFACT_SUFFIX}").write_bytes(data)
    (late / f"{digest}{ARTIFACT_SUFFIX}").write_bytes(data[:-1])
    registry = ArtifactRegistry([late])
    registry.add_directory(early)
    registry.add_directory(early)
    assert registry.directories == [early, late]
    assert registry.data(digest) == data


def test_a_file_that_does_not_hash_to_its_name_is_corrupt(
    tmp_path: Path, sample: tuple[bytes, str]
) -> None:
    data, digest = sample
    other, _ = sample_artifact(seed=92)
    (tmp_path / f"{digest}{ARTIFACT_SUFFIX}").write_bytes(other)
    registry = ArtifactRegistry([tmp_path])
    with pytest.raises(CorruptArtifactError, match="does not hash to its name"):
        registry.get(digest)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    (tmp_path / f"{digest}{ARTIFACT_SUFFIX}").write_bytes(bytes(flipped))
    with pytest.raises(CorruptArtifactError):
        ArtifactRegistry([tmp_path]).get(digest)


def test_a_file_too_large_is_refused_before_it_is_read(
    tmp_path: Path, sample: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, digest = sample
    (tmp_path / f"{digest}{ARTIFACT_SUFFIX}").write_bytes(data)
    monkeypatch.setattr(transform_artifact, "MAX_ARTIFACT_BYTES", len(data) - 1)
    with pytest.raises(CorruptArtifactError, match="too large"):
        ArtifactRegistry([tmp_path]).get(digest)


def test_fetched_artifacts_are_held_and_persisted_to_the_first_writable_directory(
    tmp_path: Path, sample: tuple[bytes, str]
) -> None:
    data, digest = sample
    # Two directories that cannot be written (root writes anywhere): a path under a
    # file, and a directory where the partial file's name is taken by a directory.
    blocked = tmp_path / "a_file"
    blocked.write_bytes(b"not a directory")
    taken = tmp_path / "taken"
    (taken / f".{digest}.{os.getpid()}.partial").mkdir(parents=True)
    target = tmp_path / "cache" / "artifacts"
    later = tmp_path / "later"
    asked = []

    def fetch(wanted: str) -> bytes:
        asked.append(wanted)
        return data

    registry = ArtifactRegistry([blocked / "sub", taken, target, later], fetch=fetch)
    assert registry.get(digest).model == "org/model@main"
    assert registry.get(digest) is registry.get(digest)
    assert registry.data(digest) == data
    assert asked == [digest]
    assert (target / f"{digest}{ARTIFACT_SUFFIX}").read_bytes() == data
    assert sorted(os.listdir(target)) == [f"{digest}{ARTIFACT_SUFFIX}"]  # no partial file
    assert not later.exists()
    assert not (taken / f"{digest}{ARTIFACT_SUFFIX}").exists()
    # Another process finds the persisted file without fetching.
    again = ArtifactRegistry([blocked, taken, target], fetch=lambda _: pytest.fail("fetched"))
    assert again.data(digest) == data


def test_a_fetch_that_returns_another_artifact_is_corrupt(
    tmp_path: Path, sample: tuple[bytes, str]
) -> None:
    _, digest = sample
    other, _ = sample_artifact(seed=93)
    registry = ArtifactRegistry([tmp_path], fetch=lambda _: other)
    with pytest.raises(CorruptArtifactError, match=digest):
        registry.get(digest)
    assert os.listdir(tmp_path) == []


def test_without_a_writable_directory_a_fetched_artifact_is_still_held(
    tmp_path: Path, sample: tuple[bytes, str]
) -> None:
    data, digest = sample
    blocked = tmp_path / "a_file"
    blocked.write_bytes(b"")
    registry = ArtifactRegistry([blocked], fetch=lambda _: data)
    assert registry.data(digest) == data


def test_add_verifies_and_holds(tmp_path: Path, sample: tuple[bytes, str]) -> None:
    data, digest = sample
    registry = ArtifactRegistry([tmp_path])
    assert registry.add(data) == digest
    assert os.listdir(tmp_path) == []
    assert registry.data(digest) == data
    with pytest.raises(CorruptArtifactError):
        registry.add(data[:-1])
    assert ArtifactRegistry([tmp_path]).add(data, persist=True) == digest
    assert (tmp_path / f"{digest}{ARTIFACT_SUFFIX}").read_bytes() == data


def test_the_process_registry_reads_the_environment_directories(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MINICACHE_ARTIFACT_DIRS", f"{tmp_path / 'a'}::{tmp_path / 'b'}")
    directories = transform_artifact._default_directories()
    assert directories[:2] == [tmp_path / "a", tmp_path / "b"]
    assert directories[-1] == transform_artifact.BUNDLED_DIRECTORY
    assert len(directories) == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__class__(a.model, a.shape, a.rope[:-1], a.groups, a.coder), "per layer"),
        (lambda a: a.__class__(a.model, a.shape, a.rope, a.groups, "lzma"), "coder"),
        (
            lambda a: a.__class__(a.model, a.shape, a.rope, (a.groups[0], a.groups[0]), a.coder),
            "overlaps",
        ),
    ],
)
def test_an_inconsistent_artifact_cannot_be_built(change: Callable, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        change(built_artifact())
