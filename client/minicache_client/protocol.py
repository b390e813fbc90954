"""The cache protocol's requests and response streams, shared by the sync and async clients.

- `check_id`, `check_tag`, `check_policy_text`, `requested_policy`: the rules of ids
  (`MAX_ID_BYTES`), content tags (`MAX_TAG_BYTES`) and policies sent in a request
  (`MAX_POLICY_BYTES`, `MAX_POLICY_NESTING`). The server applies the same functions to
  what it receives, so the client and the server refuse the same values.
- `sequence_ref`, `sequence_header`: validated protobuf names and headers.
- `carried_layers`: a put's layers as NumPy carriers, checked against one shape.
- `put_requests`: a whole put as a stream (header, then every layer's chunks).
- `PutProgress`: a streamed put, layer by layer; which layers are still missing.
- `append_request`: a unary append, checked against the message size limit.
- `PrefetchPlan`: a prefetch's arguments, validated, and its request.
- `PrefetchStream`: the messages of a Prefetch response stream turned into whole layers,
  `(layer, keys, values)` with keys and values `[kv_heads, end - start, head_dim]`, in
  ascending layer order as soon as each is complete; compressed entries are verified
  (checksum) and restored here (a transform entry with the calibration artifact of the
  process's registry, `transform_artifact.ARTIFACTS`).
- `artifact_request`, `ArtifactStream`: a GetArtifact call's request, and its response
  stream's pieces put together into the artifact file, checked against its hash.

Arguments the server would reject for their form (ids, tags, policy text, counts) are
rejected here first with `InvalidArgumentError`; limits that are the server's settings
(sizes, tokens, layers, budgets) are the server's to check;
a server stream that breaks the protocol raises `InvalidArgumentError` or
`FailedPreconditionError` (never a partial tensor); an entry that fails its checksum
raises `CorruptDataError`. Restoring a transform entry whose calibration artifact the
process lacks raises `FailedPreconditionError` naming its hash (unless the registry
fetches it: `CacheClient.use_for_artifacts`), one whose artifact fails verification
`CorruptDataError`; the `ArtifactError` is the exception's `__cause__`.
"""

from __future__ import annotations

import hashlib
import numbers
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from minicache_client.entry import CorruptEntryError, LayerGroupEntry, decode_entry
from minicache_client.errors import (
    CacheError,
    CorruptDataError,
    FailedPreconditionError,
    InvalidArgumentError,
    OutOfRangeError,
    clipped,
)
from minicache_client.policy import CompressionPolicy, request_policy
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.restore import restore_layer
from minicache_client.tensors import as_carrier, check_dtype
from minicache_client.transform_artifact import (
    MAX_ARTIFACT_BYTES,
    ArtifactError,
    CorruptArtifactError,
    MissingArtifactError,
    check_digest,
)
from minicache_client.wire import (
    DTYPE_TO_WIRE,
    LayerAssembler,
    carrier_of,
    dtype_from_wire,
    layer_chunks,
    serialized_layer_chunks,
    tokens_per_chunk,
)

MAX_UINT32 = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1
# A sequence's content tag (SequenceHeader.tag): opaque bytes, e.g. a digest of the
# tokens whose KV it holds. The server enforces the same limit.
MAX_TAG_BYTES = 64
# Model and sequence ids: printable ASCII without spaces (they name Redis keys and log
# fields), at most this many bytes.
MAX_ID_BYTES = 256
_ID = re.compile(r"^[\x21-\x7e]+$")
# A policy sent in a request: a preset name or policy JSON. A calibrated policy's JSON
# takes about 5 KB and nests 5 levels; these bounds keep a hostile one from costing
# the server memory or recursion.
MAX_POLICY_BYTES = 64 << 10
MAX_POLICY_NESTING = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")

WIRE_FORMS = {"restored": pb.WIRE_FORM_RESTORED, "compressed": pb.WIRE_FORM_COMPRESSED}

Layer = tuple[int, np.ndarray, np.ndarray]


def check_count(name: str, value: Any, minimum: int = 0, maximum: int = MAX_UINT64) -> int:
    """`value` as an int within [minimum, maximum]; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise InvalidArgumentError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def check_tag(tag: Any) -> bytes:
    """`tag` as bytes of at most `MAX_TAG_BYTES` (bytes, bytearray or memoryview; a str
    is refused: encode it, or better, store a digest)."""
    if not isinstance(tag, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(
            f"tag must be bytes (at most {MAX_TAG_BYTES}), got {type(tag).__name__}"
        )
    tag = bytes(tag)
    if len(tag) > MAX_TAG_BYTES:
        raise InvalidArgumentError(
            f"tag is {len(tag)} bytes, more than the limit of {MAX_TAG_BYTES}: store a "
            "digest of the content"
        )
    return tag


def check_id(value: Any, what: str) -> str:
    """A model or sequence id: 1 to `MAX_ID_BYTES` printable ASCII characters, no spaces."""
    rule = (
        f"{what} must be a non-empty string of 1-{MAX_ID_BYTES} printable ASCII characters "
        "without spaces"
    )
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{rule}, got {type(value).__name__}")
    if not value:
        raise InvalidArgumentError(f"{rule}, got an empty one")
    if len(value) > MAX_ID_BYTES or not _ID.match(value):
        raise InvalidArgumentError(f"{rule}, got {clipped(repr(value), 48)}")
    return value


def check_policy_text(policy: Any) -> str:
    """A policy as a request carries it (a preset name or policy JSON, empty for the
    server's default), at most `MAX_POLICY_BYTES`, nesting at most `MAX_POLICY_NESTING`
    levels; whether it names a valid policy is `requested_policy`'s to say."""
    if not isinstance(policy, str):
        raise InvalidArgumentError(
            f"policy must be a preset name or JSON text, got {type(policy).__name__}"
        )
    size = len(policy.encode("utf-8", "surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise InvalidArgumentError(
            f"policy is {size} bytes, more than the limit of {MAX_POLICY_BYTES}: send a "
            "preset name or a policy's JSON"
        )
    if _json_nesting(policy) > MAX_POLICY_NESTING:
        raise InvalidArgumentError(
            f"policy: JSON nests deeper than {MAX_POLICY_NESTING} levels; a policy nests 5"
        )
    return policy


def _json_nesting(text: str) -> int:
    """How deep the arrays and objects of JSON `text` nest (brackets in strings skipped)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def requested_policy(text: str) -> CompressionPolicy:
    """The policy a request names (a preset or JSON, within `check_policy_text`'s
    bounds); InvalidArgumentError says what is wrong with it."""
    check_policy_text(text)
    try:
        return request_policy(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgumentError(f"policy: {clipped(str(exc), 200)}") from None


def sequence_ref(model_id: str, sequence_id: str) -> pb.SequenceRef:
    return pb.SequenceRef(
        model_id=check_id(model_id, "model_id"), sequence_id=check_id(sequence_id, "sequence_id")
    )


def sequence_header(
    model_id: str,
    sequence_id: str,
    *,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    start_token: int,
    end_token: int,
    policy: str = "",
    seal: bool = False,
    tag: bytes = b"",
) -> pb.SequenceHeader:
    """The header of tokens [start_token, end_token) of every layer, `[kv_heads, tokens,
    head_dim]` each in `dtype`. `tag` labels the sequence's content once the write
    commits (empty clears it)."""
    start_token = check_count("start_token", start_token)
    end_token = check_count("end_token", end_token)
    if end_token <= start_token:
        raise InvalidArgumentError(
            f"end_token ({end_token}) must exceed start_token ({start_token}): a write "
            "holds at least one token"
        )
    check_policy_text(policy)
    if policy and start_token != 0:
        raise InvalidArgumentError(
            "policy can only be set by a write from token 0; an extension keeps the "
            "sequence's policy"
        )
    return pb.SequenceHeader(
        sequence=sequence_ref(model_id, sequence_id),
        num_layers=check_count("num_layers", num_layers, 1, MAX_UINT32),
        kv_heads=check_count("kv_heads", kv_heads, 1, MAX_UINT32),
        head_dim=check_count("head_dim", head_dim, 1, MAX_UINT32),
        dtype=DTYPE_TO_WIRE[check_dtype(dtype)],
        start_token=start_token,
        end_token=end_token,
        policy=policy,
        seal=bool(seal),
        tag=check_tag(tag),
    )


@dataclass(frozen=True)
class LayerShape:
    """Every layer's keys and values are `[kv_heads, tokens, head_dim]`."""

    kv_heads: int
    tokens: int
    head_dim: int


def carried_layers(
    layers: Sequence[tuple[Any, Any]], dtype: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], LayerShape]:
    """The NumPy carriers of `layers`, a sequence of (keys, values) per layer, each
    `[kv_heads, tokens, head_dim]` with the same shape in every layer."""
    check_dtype(dtype)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise InvalidArgumentError(
            "layers must be a non-empty sequence of (keys, values), one pair per layer"
        )
    carried = []
    shape = None
    for layer, pair in enumerate(layers):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidArgumentError(f"layer {layer}: expected a (keys, values) pair")
        keys, values = (as_carrier(tensor, dtype) for tensor in pair)
        if keys.ndim != 3 or keys.shape != values.shape:
            raise InvalidArgumentError(
                f"layer {layer}: keys {keys.shape} and values {values.shape} must both be "
                "[kv_heads, tokens, head_dim]"
            )
        if shape is None:
            shape = keys.shape
        elif keys.shape != shape:
            raise InvalidArgumentError(
                f"layer {layer}: shape {keys.shape} differs from layer 0's {shape}; every "
                "layer is [kv_heads, tokens, head_dim] with the same sizes"
            )
        carried.append((keys, values))
    kv_heads, tokens, head_dim = shape
    if 0 in shape:
        raise InvalidArgumentError(f"layers of shape {shape} hold no KV")
    return carried, LayerShape(kv_heads, tokens, head_dim)


def put_requests(
    header: pb.SequenceHeader,
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    dtype: str,
    max_chunk_bytes: int,
) -> Iterator[bytes]:
    """The header, then the chunks of every layer in order, as serialized `PutRequest`s
    (each chunk built with one copy of its KV: `wire.serialized_layer_chunks`; carriers
    from `carried_layers`: nothing here can fail once the call has started)."""
    yield pb.PutRequest(header=header).SerializeToString()
    for layer, (keys, values) in enumerate(layers):
        yield from serialized_layer_chunks(
            layer, keys, values, dtype, pb.PutRequest, max_chunk_bytes
        )


class PutProgress:
    """A put streamed layer by layer: each layer `[kv_heads, end_token - start_token,
    head_dim]` is sent once, in any order, and all of them before the stream ends."""

    def __init__(self, header: pb.SequenceHeader, max_chunk_bytes: int) -> None:
        self.header = header
        self.dtype = dtype_from_wire(header.dtype)
        self.shape = (header.kv_heads, header.end_token - header.start_token, header.head_dim)
        self.max_chunk_bytes = max_chunk_bytes
        # Fails now, not mid-stream, when one token of a layer exceeds the chunk limit.
        tokens_per_chunk(header.kv_heads, header.head_dim, self.dtype, max_chunk_bytes)
        self.sent: set[int] = set()

    def layer_requests(self, layer: int, keys: Any, values: Any) -> list[pb.PutRequest]:
        """The chunks of one layer, as requests; keys and values `[kv_heads, tokens,
        head_dim]` of the header's range."""
        layer = check_count("layer", layer, 0, self.header.num_layers - 1)
        if layer in self.sent:
            raise InvalidArgumentError(f"layer {layer} was already sent")
        keys, values = as_carrier(keys, self.dtype), as_carrier(values, self.dtype)
        for name, tensor in (("keys", keys), ("values", values)):
            if tensor.shape != self.shape:
                raise InvalidArgumentError(
                    f"layer {layer}: {name} have shape {tensor.shape}, expected "
                    f"[kv_heads, tokens, head_dim] = {list(self.shape)}"
                )
        requests = [
            pb.PutRequest(chunk=chunk)
            for chunk in layer_chunks(layer, keys, values, self.dtype, self.max_chunk_bytes)
        ]
        self.sent.add(layer)
        return requests

    def missing_layers(self) -> list[int]:
        return [layer for layer in range(self.header.num_layers) if layer not in self.sent]


def append_request(
    model_id: str,
    sequence_id: str,
    layers: Sequence[tuple[Any, Any]],
    *,
    dtype: str,
    start_token: int,
    max_message_bytes: int,
    tag: bytes = b"",
) -> pb.AppendRequest:
    """Tokens [start_token, start_token + tokens) of every layer, one chunk per layer;
    `tag` labels the sequence's content after the append (empty clears it)."""
    carried, shape = carried_layers(layers, dtype)
    header = sequence_header(
        model_id,
        sequence_id,
        num_layers=len(carried),
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=dtype,
        start_token=start_token,
        end_token=check_count("start_token", start_token) + shape.tokens,
        tag=tag,
    )
    # Checked before the bytes are copied into the message.
    payload = sum(keys.nbytes + values.nbytes for keys, values in carried)
    if payload > max_message_bytes:
        raise InvalidArgumentError(
            f"an append of {shape.tokens} tokens x {len(carried)} layers takes {payload} "
            f"bytes, more than max_message_bytes ({max_message_bytes}); send them with put("
            f"start_token={header.start_token}) instead"
        )
    request = pb.AppendRequest(
        header=header,
        layers=[
            pb.LayerChunk(
                layer=layer,
                token_offset=0,
                tokens=shape.tokens,
                keys=keys.tobytes(),
                values=values.tobytes(),
            )
            for layer, (keys, values) in enumerate(carried)
        ],
    )
    size = request.ByteSize()
    if size > max_message_bytes:
        raise InvalidArgumentError(
            f"the append message takes {size} bytes, more than max_message_bytes "
            f"({max_message_bytes}); send these tokens with put(start_token="
            f"{header.start_token}) instead"
        )
    return request


@dataclass(frozen=True)
class PrefetchPlan:
    """A prefetch of tokens [start_token, end_token) of layers [first_layer, last_layer].

    `end_token` None: to the last token held; `last_layer` None: to the last layer.
    `dtype` None: the sequence's dtype.
    """

    ref: pb.SequenceRef
    start_token: int = 0
    end_token: int | None = None
    first_layer: int = 0
    last_layer: int | None = None
    wire_form: str = "restored"
    dtype: str | None = None

    @classmethod
    def create(
        cls,
        model_id: str,
        sequence_id: str,
        *,
        start_token: int = 0,
        end_token: int | None = None,
        first_layer: int = 0,
        last_layer: int | None = None,
        wire_form: str = "restored",
        dtype: str | None = None,
    ) -> PrefetchPlan:
        start_token = check_count("start_token", start_token)
        if end_token is not None:
            end_token = check_count("end_token", end_token)
            if end_token <= start_token:
                raise InvalidArgumentError(
                    f"end_token ({end_token}) must exceed start_token ({start_token})"
                )
        first_layer = check_count("first_layer", first_layer, 0, MAX_UINT32)
        if last_layer is not None:
            last_layer = check_count("last_layer", last_layer, 0, MAX_UINT32 - 1)
            if last_layer < first_layer:
                raise InvalidArgumentError(
                    f"last_layer ({last_layer}) must not precede first_layer ({first_layer})"
                )
        if wire_form not in WIRE_FORMS:
            raise InvalidArgumentError(
                f"wire_form must be one of {', '.join(WIRE_FORMS)}, got {wire_form!r}"
            )
        if dtype is not None:
            check_dtype(dtype)
        return cls(
            sequence_ref(model_id, sequence_id),
            start_token,
            end_token,
            first_layer,
            last_layer,
            wire_form,
            dtype,
        )

    def request(self) -> pb.PrefetchRequest:
        compressed = self.wire_form == "compressed"
        return pb.PrefetchRequest(
            sequence=self.ref,
            start_token=self.start_token,
            end_token=self.end_token or 0,
            first_layer=self.first_layer,
            # Exclusive on the wire, 0 meaning "to the last layer".
            end_layer=0 if self.last_layer is None else self.last_layer + 1,
            wire_form=WIRE_FORMS[self.wire_form],
            # Compressed entries come as stored and are restored here, into `dtype`.
            dtype=DTYPE_TO_WIRE[self.dtype] if self.dtype and not compressed else 0,
        )

    def stream(self) -> PrefetchStream:
        return PrefetchStream(self)


def _stream_error(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"prefetch stream: {message}")


class PrefetchStream:
    """Whole layers from the messages of one Prefetch response stream.

    `feed` takes each message in turn and returns the layers it completed, in ascending
    order; `finish` checks, once the stream ended, that every requested layer came.
    `complete` tells when the requested layers are all out.
    """

    def __init__(self, plan: PrefetchPlan) -> None:
        self.plan = plan
        self.header: pb.SequenceHeader | None = None
        self.dtype = ""  # of the tensors yielded
        self.layers: range = range(0)  # the requested layers
        self.next_layer = 0
        self.ready: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.assembler: LayerAssembler | None = None
        self.entry_layers: tuple[int, ...] = ()
        self.entry_total = 0
        self.entry_data: bytearray | bytes = b""

    @property
    def complete(self) -> bool:
        return self.header is not None and self.next_layer > self.layers[-1]

    def feed(self, response: pb.PrefetchResponse) -> list[Layer]:
        item = response.WhichOneof("item")
        if self.header is None:
            if item != "header":
                raise FailedPreconditionError(
                    f"prefetch stream: the first message is a {item}, not the header"
                )
            self._start(response.header)
        elif item == "header":
            raise FailedPreconditionError("prefetch stream: a second header")
        elif item == "chunk":
            self._add_chunk(response.chunk)
        elif item == "entry":
            self._add_entry_chunk(response.entry)
        else:
            raise _stream_error("an empty message")
        return self._take_ready()

    def finish(self) -> None:
        if self.header is None:
            raise FailedPreconditionError("prefetch stream ended before its header")
        if self.entry_total:
            raise FailedPreconditionError(
                f"prefetch stream ended inside the entry of layers {self.entry_layers} "
                f"({len(self.entry_data)} of {self.entry_total} bytes)"
            )
        if not self.complete:
            missing = [layer for layer in self.layers if layer >= self.next_layer]
            raise FailedPreconditionError(
                f"prefetch stream ended before layers {missing} were complete"
            )

    def _start(self, header: pb.SequenceHeader) -> None:
        plan = self.plan
        self.header = header
        stored = dtype_from_wire(header.dtype, "prefetch header dtype")
        if header.end_token < header.start_token or header.start_token != plan.start_token:
            raise _stream_error(
                f"header range [{header.start_token}, {header.end_token}) does not answer "
                f"a request from token {plan.start_token}"
            )
        if plan.end_token is not None and header.end_token != plan.end_token:
            raise _stream_error(
                f"header range ends at {header.end_token}, requested {plan.end_token}"
            )
        if header.num_layers == 0:
            raise _stream_error("header declares no layers")
        last = header.num_layers - 1 if plan.last_layer is None else plan.last_layer
        if last >= header.num_layers:
            raise OutOfRangeError(
                f"last_layer {last} is out of range for {header.num_layers} layers"
            )
        self.layers = range(plan.first_layer, last + 1)
        self.next_layer = plan.first_layer
        tokens = header.end_token - header.start_token
        if plan.wire_form == "compressed":
            self.dtype = plan.dtype or stored
            return
        if plan.dtype is not None and stored != plan.dtype:
            raise _stream_error(f"tensors come in {stored}, requested {plan.dtype}")
        self.dtype = stored
        if tokens == 0:
            shape = (header.kv_heads, 0, header.head_dim)
            carrier = carrier_of(stored)
            for layer in self.layers:
                self.ready[layer] = (np.empty(shape, carrier), np.empty(shape, carrier))
            return
        self.assembler = LayerAssembler(
            header.num_layers, header.kv_heads, tokens, header.head_dim, stored
        )

    def _add_chunk(self, chunk: pb.LayerChunk) -> None:
        if self.assembler is None:
            raise _stream_error(f"a layer chunk in a {self.plan.wire_form} stream")
        if chunk.layer not in self.layers:
            raise _stream_error(
                f"a chunk of layer {chunk.layer}, outside the requested layers "
                f"[{self.layers.start}, {self.layers.stop})"
            )
        layer = self.assembler.add(chunk)
        if layer is not None:
            self.ready[chunk.layer] = layer

    def _add_entry_chunk(self, chunk: pb.EntryChunk) -> None:
        if self.plan.wire_form != "compressed":
            raise _stream_error("a stored entry in a restored stream")
        layers = tuple(chunk.layers)
        if not self.entry_total:  # the first piece of an entry
            if chunk.offset != 0 or chunk.total_bytes == 0 or not layers:
                raise _stream_error(
                    f"entry of layers {layers} starts at byte {chunk.offset} of {chunk.total_bytes}"
                )
            self.entry_layers, self.entry_total = layers, chunk.total_bytes
            # An entry in one piece is decoded from the message's bytes, without a copy.
            whole = len(chunk.data) == chunk.total_bytes
            self.entry_data = chunk.data if whole else bytearray(chunk.data)
        else:
            if (layers, chunk.total_bytes) != (self.entry_layers, self.entry_total):
                raise _stream_error(
                    f"entry chunk of layers {layers} ({chunk.total_bytes} bytes) inside "
                    f"the entry of layers {self.entry_layers} ({self.entry_total} bytes)"
                )
            if chunk.offset != len(self.entry_data):
                raise FailedPreconditionError(
                    f"prefetch stream: entry chunk at byte {chunk.offset}, expected "
                    f"{len(self.entry_data)} (pieces must arrive in order)"
                )
            self.entry_data += chunk.data
        if len(self.entry_data) > self.entry_total:
            raise _stream_error(f"entry of layers {layers} overruns its {self.entry_total} bytes")
        if len(self.entry_data) == self.entry_total:
            data, self.entry_data, self.entry_total = self.entry_data, b"", 0
            self._restore(self._decode(data))

    def _decode(self, data: bytes | bytearray) -> LayerGroupEntry:
        header = self.header
        try:
            entry = decode_entry(data)
        except CorruptEntryError as exc:
            raise CorruptDataError(
                f"stored entry of layers {self.entry_layers} failed verification ({exc}); "
                "it was discarded"
            ) from exc
        stored = dtype_from_wire(header.dtype)
        if (
            entry.layers != self.entry_layers
            or entry.dtype != stored
            or (entry.kv_heads, entry.head_dim) != (header.kv_heads, header.head_dim)
        ):
            raise _stream_error(
                f"entry of layers {entry.layers} ({entry.kv_heads} heads x {entry.head_dim} "
                f"in {entry.dtype}) disagrees with its chunks' layers {self.entry_layers} or "
                f"the header ({header.kv_heads} x {header.head_dim} in {stored})"
            )
        return entry

    def _restore(self, entry: LayerGroupEntry) -> None:
        header = self.header
        for layer in sorted(entry.layers):
            if layer not in self.layers or layer < self.next_layer or layer in self.ready:
                continue
            try:
                keys, values = restore_layer(
                    entry, layer, header.start_token, header.end_token, self.dtype
                )
            except CacheError:  # fetching an artifact failed (`use_for_artifacts`)
                raise
            except ArtifactError as exc:
                raise artifact_error(exc, f"layer {layer}") from exc
            except ValueError as exc:
                raise _stream_error(f"layer {layer}: {exc}") from exc
            self.ready[layer] = (np.asarray(keys), np.asarray(values))

    def _take_ready(self) -> list[Layer]:
        out = []
        while self.next_layer in self.ready:
            keys, values = self.ready.pop(self.next_layer)
            out.append((self.next_layer, keys, values))
            self.next_layer += 1
        return out


# -- calibration artifacts ----------------------------------------------------------------


def artifact_error(error: ArtifactError, what: str) -> CacheError:
    """The typed error of a calibration artifact that `what` (a restore) could not use:
    FailedPreconditionError when the process lacks it (or it does not fit),
    CorruptDataError when it failed verification."""
    detail = clipped(str(error), 240)
    if isinstance(error, MissingArtifactError):
        return FailedPreconditionError(
            f"{what}: calibration artifact {error.digest} is not held here: fetch it from "
            "the cache server (client.use_for_artifacts()), put it in an artifact directory "
            "(MINICACHE_ARTIFACT_DIRS), or prefetch the restored wire form"
        )
    if isinstance(error, CorruptArtifactError):
        return CorruptDataError(f"{what}: calibration artifact failed verification: {detail}")
    return FailedPreconditionError(f"{what}: calibration artifact: {detail}")


def artifact_request(digest: str) -> pb.GetArtifactRequest:
    """GetArtifact's request; InvalidArgumentError for a hash that is not 64 lowercase
    hex digits (the server refuses the same)."""
    try:
        check_digest(digest)
    except ArtifactError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return pb.GetArtifactRequest(digest=digest)


class ArtifactStream:
    """The pieces of one GetArtifact response stream, put together: `feed` each message,
    then `finish()` gives the file, checked to hash to `digest` (CorruptArtifactError
    otherwise). A stream that breaks the protocol (pieces out of order, sizes that
    disagree, more than `MAX_ARTIFACT_BYTES`) raises InvalidArgumentError; one that ends
    early FailedPreconditionError."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.total: int | None = None
        self.data = bytearray()

    def feed(self, response: pb.GetArtifactResponse) -> None:
        if self.total is None:
            if not 0 < response.total_bytes <= MAX_ARTIFACT_BYTES:
                raise InvalidArgumentError(
                    f"artifact stream: an artifact of {response.total_bytes} bytes (at most "
                    f"{MAX_ARTIFACT_BYTES})"
                )
            self.total = response.total_bytes
        elif response.total_bytes != self.total:
            raise InvalidArgumentError(
                f"artifact stream: a piece of {response.total_bytes} bytes in an artifact of "
                f"{self.total}"
            )
        if response.offset != len(self.data):
            raise InvalidArgumentError(
                f"artifact stream: a piece at byte {response.offset}, expected {len(self.data)}"
            )
        if len(self.data) + len(response.data) > self.total:
            raise InvalidArgumentError(f"artifact stream: more than its {self.total} bytes")
        self.data += response.data

    def finish(self) -> bytes:
        if self.total is None or len(self.data) != self.total:
            raise FailedPreconditionError(
                f"artifact stream ended after {len(self.data)} of {self.total or '?'} bytes"
            )
        data = bytes(self.data)
        self.data = bytearray()
        if hashlib.sha256(data).hexdigest() != self.digest:
            raise CorruptArtifactError(
                f"artifact {self.digest} fetched from the server does not hash to its name"
            )
        return data
