"""Compression policies: which adjacent layers merge (MiniCache), how KV is quantized,
and which layer groups are transform coded.

A policy is a small JSON-serialisable value object. It is model-agnostic where it can
be (the paper's rule "merge from layer L/2 on" works for any depth) and explicit where
calibration made it specific (a list of pairs). `resolve_layer_groups(num_layers)`
turns it into the concrete layer groups of one model.

Presets (see `PRESETS`): `none`, `paper` (exact paper defaults: S = L/2, t = 0.6,
γ = 0.05, most distinct tokens retained), `paper_kivi4` (the paper's headline setting:
that merge on top of 4-bit KIVI), `average` (plain averaging, the paper's baseline),
`kivi4`, `kivi2`, and `default` (the policy shipped after calibration on the bundled
model: cross-layer transform coding, `TransformPlan`; see docs/results.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

RETENTION_SIDES = ("most_distinct", "least_distinct")
MERGE_METHODS = ("slerp", "average")
QUANT_BITS = (2, 3, 4, 8)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    # JSON policies arrive from clients: 4.0 or true is not a bit width or a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _require_count(name: str, value: Any, minimum: int = 0) -> None:
    _require(
        _is_int(value) and value >= minimum,
        f"{name} must be >= {minimum}, got {value!r} (an integer)",
    )


@dataclass(frozen=True)
class Retention:
    """Which tokens of a merged pair stay unmerged.

    Angular distance d = Ω/π per (head, token). With `fraction` unset, the paper's rule:
    min-max normalise d over the first put's tokens and heads and retain
    d̃ ≥ 1 − γ (`side="most_distinct"`) or d̃ ≤ γ (`side="least_distinct"`). With
    `fraction` set, retain that fraction of (head, token) units from the chosen side.
    The first put fixes the distance threshold; later appends are tested against it.
    `sink_tokens` leading tokens are always retained, for every head.
    """

    gamma: float = 0.05
    fraction: float | None = None
    side: str = "most_distinct"
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        _require(0.0 <= self.gamma <= 1.0, f"retention gamma must be in [0, 1], got {self.gamma}")
        _require(
            self.fraction is None or 0.0 <= self.fraction <= 1.0,
            f"retention fraction must be in [0, 1], got {self.fraction}",
        )
        _require(
            self.side in RETENTION_SIDES,
            f"retention side must be one of {RETENTION_SIDES}, got {self.side!r}",
        )
        _require_count("sink_tokens", self.sink_tokens)


@dataclass(frozen=True)
class PairMerge:
    """Merge layers (first_layer, first_layer + 1), keys and/or values.

    `method="slerp"`: SLERP of directions with interpolation `t`, both layers'
    magnitudes kept per token. `method="average"`: both layers restored as their
    plain mean (the paper's baseline; `t` and retention unused).

    `window`: the most recent `window` tokens stay unmerged (both layers, 16-bit) and
    are merged once that many newer tokens follow them. Most attention goes to recent
    tokens, so merging them is what costs at decode time; 0 (the paper) merges every
    token as it arrives.
    """

    first_layer: int
    keys: bool = True
    values: bool = True
    t: float = 0.6
    method: str = "slerp"
    retention: Retention | None = field(default_factory=Retention)
    window: int = 0

    def __post_init__(self) -> None:
        _require_count("first_layer", self.first_layer)
        _require(
            isinstance(self.keys, bool) and isinstance(self.values, bool),
            "a pair's keys and values flags must be true or false",
        )
        _require(self.keys or self.values, "a pair must merge keys, values or both")
        _require(
            isinstance(self.t, (int, float)) and not isinstance(self.t, bool) and 0 <= self.t <= 1,
            f"t must be in [0, 1], got {self.t!r}",
        )
        _require_count("merge window", self.window)
        _require(
            self.method in MERGE_METHODS,
            f"merge method must be one of {MERGE_METHODS}, got {self.method!r}",
        )

    @property
    def layers(self) -> tuple[int, int]:
        return (self.first_layer, self.first_layer + 1)


@dataclass(frozen=True)
class MergePlan:
    """Either the paper's rule (pairs (S, S+1), (S+2, S+3), ... from `start_layer`,
    default L/2, all with the same settings) or an explicit list of `pairs`."""

    start_layer: int | None = None
    pairs: tuple[PairMerge, ...] | None = None
    keys: bool = True
    values: bool = True
    t: float = 0.6
    method: str = "slerp"
    retention: Retention | None = field(default_factory=Retention)
    window: int = 0

    def __post_init__(self) -> None:
        _require(
            self.start_layer is None or _is_int(self.start_layer),
            f"start_layer must be an integer, got {self.start_layer!r}",
        )
        if self.pairs is not None:
            _require(self.start_layer is None, "give either start_layer or pairs, not both")
            layers = [layer for pair in self.pairs for layer in pair.layers]
            _require(
                len(layers) == len(set(layers)),
                f"merge pairs overlap: {[pair.layers for pair in self.pairs]}",
            )
        else:
            # Validates the shared settings once.
            self._pair(0)

    def _pair(self, first_layer: int) -> PairMerge:
        return PairMerge(
            first_layer, self.keys, self.values, self.t, self.method, self.retention, self.window
        )

    def resolve(self, num_layers: int) -> tuple[PairMerge, ...]:
        """The concrete pairs for a model with `num_layers` layers."""
        if self.pairs is not None:
            for pair in self.pairs:
                _require(
                    pair.first_layer + 1 < num_layers,
                    f"merge pair {pair.layers} is out of range for a model of {num_layers} layers",
                )
            return tuple(sorted(self.pairs, key=lambda pair: pair.first_layer))
        start = num_layers // 2 if self.start_layer is None else self.start_layer
        _require(
            0 <= start < num_layers,
            f"start_layer {start} is out of range for {num_layers} layers",
        )
        return tuple(self._pair(first) for first in range(start, num_layers - 1, 2))


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer, overriding the policy-wide ones (None: 16-bit)."""

    layer: int
    key_bits: int | None
    value_bits: int | None

    def __post_init__(self) -> None:
        _require_count("layer_bits layer", self.layer)
        _check_bits(f"layer {self.layer} key_bits", self.key_bits)
        _check_bits(f"layer {self.layer} value_bits", self.value_bits)


def _check_bits(what: str, bits: int | None) -> None:
    _require(
        bits is None or (_is_int(bits) and bits in QUANT_BITS),
        f"{what} must be one of {QUANT_BITS} or null, got {bits}",
    )


@dataclass(frozen=True)
class Quantization:
    """KIVI-style asymmetric min/max quantization stacked on whatever is stored.

    Keys per channel, in groups of `key_group_size` tokens; values per token, in groups
    of `value_group_size` channels. `bits=None` keeps that side in 16-bit. The first
    `sink_tokens` tokens and the `window` most recent ones stay in 16-bit; layers in
    `full_precision_layers` are not quantized at all.
    """

    key_bits: int | None = 4
    value_bits: int | None = 4
    key_group_size: int = 32
    value_group_size: int = 32
    window: int = 0
    sink_tokens: int = 0
    full_precision_layers: tuple[int, ...] = ()
    layer_bits: tuple[LayerBits, ...] = ()

    def __post_init__(self) -> None:
        _check_bits("key_bits", self.key_bits)
        _check_bits("value_bits", self.value_bits)
        layers = [override.layer for override in self.layer_bits]
        _require(len(layers) == len(set(layers)), f"layer_bits names a layer twice: {layers}")
        _require_count("key_group_size", self.key_group_size, 1)
        _require_count("value_group_size", self.value_group_size, 1)
        _require_count("window", self.window)
        _require_count("sink_tokens", self.sink_tokens)
        for layer in self.full_precision_layers:
            _require_count("full_precision_layers entry", layer)

    def bits_for(self, kind: str, layer: int) -> int | None:
        if layer in self.full_precision_layers:
            return None
        bits = next((o for o in self.layer_bits if o.layer == layer), self)
        return bits.key_bits if kind == "keys" else bits.value_bits


# A calibration artifact's name: its SHA-256, in lowercase hex (transform_artifact.py).
ARTIFACT_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TransformPlan:
    """Cross-layer transform coding of `groups` (consecutive layers each) with the
    calibration artifact whose SHA-256 is `artifact` (minicache_client.transform_artifact).

    The first `sink_tokens` tokens and the `window` most recent ones stay exact; every
    other token is projected on the group's calibrated basis, quantized and entropy
    coded once it leaves the window. Layers in no group are stored as the rest of the
    policy says (merge, quantization, or exact).
    """

    artifact: str
    groups: tuple[tuple[int, ...], ...]
    sink_tokens: int = 16
    window: int = 32

    def __post_init__(self) -> None:
        _require(
            isinstance(self.artifact, str) and ARTIFACT_HASH.fullmatch(self.artifact) is not None,
            f"transform artifact must be a SHA-256 hash in hex, got {str(self.artifact)[:80]!r}",
        )
        groups = tuple(tuple(group) for group in self.groups)
        object.__setattr__(self, "groups", groups)
        _require(bool(groups) and all(groups), "a transform plan needs non-empty layer groups")
        layers = [layer for group in groups for layer in group]
        for layer in layers:
            _require_count("transform group layer", layer)
        _require(len(layers) == len(set(layers)), f"transform groups overlap: {groups}")
        for group in groups:
            _require(
                list(group) == list(range(group[0], group[0] + len(group))),
                f"a transform group is consecutive layers, got {group}",
            )
        _require_count("transform sink_tokens", self.sink_tokens)
        _require_count("transform window", self.window)

    @property
    def layers(self) -> set[int]:
        return {layer for group in self.groups for layer in group}


@dataclass(frozen=True)
class LayerGroup:
    """One stored unit: a single layer, a pair merged for keys and/or values, or the
    consecutive layers of one transform group."""

    layers: tuple[int, ...]
    merge: PairMerge | None = None
    transform: TransformPlan | None = None


@dataclass(frozen=True)
class ModelShape:
    """The KV shape of a model: what a calibrated policy was measured on."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim"):
            _require_count(name, getattr(self, name), 1)


@dataclass(frozen=True)
class CompressionPolicy:
    """A merge plan plus quantization. `calibrated_for`: the model shape a calibrated
    policy was measured on; `policy_for_model` uses it only for that shape."""

    name: str = "custom"
    merge: MergePlan | None = None
    quantization: Quantization | None = None
    description: str = ""
    calibrated_for: ModelShape | None = None
    transform: TransformPlan | None = None

    def unfit_reason(self, shape: ModelShape) -> str | None:
        """Why this policy cannot serve a model of `shape`; None when it can."""
        if self.calibrated_for is not None and self.calibrated_for != shape:
            calibrated = self.calibrated_for
            return (
                f"policy {self.name!r} was calibrated for {calibrated.num_layers} layers x "
                f"{calibrated.kv_heads} KV heads x {calibrated.head_dim} dims, not "
                f"{shape.num_layers} x {shape.kv_heads} x {shape.head_dim}"
            )
        try:
            self.resolve_layer_groups(shape.num_layers)
        except ValueError as exc:
            return str(exc)
        return None

    @property
    def stores_raw(self) -> bool:
        """Neither merge nor quantization: every token is stored as it arrived."""
        return self.merge is None and self.quantization is None and self.transform is None

    @property
    def min_num_layers(self) -> int:
        """The fewest layers a model needs for every layer this policy names to exist."""
        named = [0]
        if self.merge is not None and self.merge.pairs:
            named += [pair.first_layer + 1 for pair in self.merge.pairs]
        if self.quantization is not None:
            named += [o.layer for o in self.quantization.layer_bits]
            named += list(self.quantization.full_precision_layers)
        if self.transform is not None:
            named += list(self.transform.layers)
        return max(named) + 1

    def resolve_layer_groups(self, num_layers: int) -> tuple[LayerGroup, ...]:
        """Every layer of the model exactly once, in layer order."""
        _require(num_layers >= 1, f"num_layers must be >= 1, got {num_layers}")
        if self.quantization is not None:
            named = [o.layer for o in self.quantization.layer_bits]
            named += list(self.quantization.full_precision_layers)
            _require(
                all(layer < num_layers for layer in named),
                f"quantization names layers {sorted(set(named))}; the model has {num_layers}",
            )
        pairs = self.merge.resolve(num_layers) if self.merge else ()
        by_first = {pair.first_layer: pair for pair in pairs}
        transformed = {}
        if self.transform is not None:
            _require(
                max(self.transform.layers) < num_layers,
                f"transform groups name layers up to {max(self.transform.layers)}; the "
                f"model has {num_layers}",
            )
            merged = {layer for pair in pairs for layer in pair.layers}
            _require(
                not merged & self.transform.layers,
                "a layer cannot be both merged and transform coded",
            )
            transformed = {group[0]: group for group in self.transform.groups}
        groups: list[LayerGroup] = []
        layer = 0
        while layer < num_layers:
            pair = by_first.get(layer)
            if layer in transformed:
                group = transformed[layer]
                groups.append(LayerGroup(group, transform=self.transform))
                layer += len(group)
            elif pair is not None:
                groups.append(LayerGroup(pair.layers, pair))
                layer += 2
            else:
                groups.append(LayerGroup((layer,)))
                layer += 1
        return tuple(groups)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPolicy:
        try:
            return _policy_from_dict(data)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"malformed compression policy: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> CompressionPolicy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"compression policy is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("compression policy JSON must be an object")
        return cls.from_dict(data)


def _retention_from(data: dict[str, Any] | None) -> Retention | None:
    return None if data is None else Retention(**data)


def _pair_from(data: dict[str, Any]) -> PairMerge:
    data = dict(data)
    data["retention"] = _retention_from(data.get("retention"))
    return PairMerge(**data)


def _policy_from_dict(data: dict[str, Any]) -> CompressionPolicy:
    merge = data.get("merge")
    if merge is not None:
        merge = dict(merge)
        merge["retention"] = _retention_from(merge.get("retention"))
        if merge.get("pairs") is not None:
            merge["pairs"] = tuple(_pair_from(pair) for pair in merge["pairs"])
        merge = MergePlan(**merge)
    quantization = data.get("quantization")
    if quantization is not None:
        quantization = dict(quantization)
        quantization["full_precision_layers"] = tuple(quantization.get("full_precision_layers", ()))
        quantization["layer_bits"] = tuple(
            LayerBits(**bits) for bits in quantization.get("layer_bits", ())
        )
        quantization = Quantization(**quantization)
    shape = data.get("calibrated_for")
    transform = data.get("transform")
    if transform is not None:
        transform = dict(transform)
        transform["groups"] = tuple(tuple(group) for group in transform["groups"])
        transform = TransformPlan(**transform)
    return CompressionPolicy(
        name=data.get("name", "custom"),
        merge=merge,
        quantization=quantization,
        description=data.get("description", ""),
        calibrated_for=None if shape is None else ModelShape(**shape),
        transform=transform,
    )


_PAPER_MERGE = MergePlan(start_layer=None, t=0.6, retention=Retention(gamma=0.05))
_KIVI4 = Quantization(key_bits=4, value_bits=4, key_group_size=32, value_group_size=32)

_DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.json")

PRESETS: dict[str, CompressionPolicy] = {
    "none": CompressionPolicy("none", description="no compression: the full 16-bit cache"),
    "paper": CompressionPolicy(
        "paper",
        merge=_PAPER_MERGE,
        description="MiniCache paper defaults: SLERP merge from L/2, t=0.6, gamma=0.05",
    ),
    "paper_kivi4": CompressionPolicy(
        "paper_kivi4",
        merge=_PAPER_MERGE,
        quantization=_KIVI4,
        description="paper merge stacked on 4-bit KIVI (the paper's headline setting)",
    ),
    "average": CompressionPolicy(
        "average",
        merge=MergePlan(start_layer=None, method="average", retention=None),
        description="plain average of adjacent layers from L/2 (the paper's baseline)",
    ),
    "kivi4": CompressionPolicy(
        "kivi4", quantization=_KIVI4, description="KIVI-style 4-bit keys and values, groups of 32"
    ),
    "kivi2": CompressionPolicy(
        "kivi2",
        quantization=replace(_KIVI4, key_bits=2, value_bits=2),
        description="KIVI-style 2-bit keys and values, groups of 32",
    ),
}
# The best policy measured without calibration, for any depth: KIVI 4-bit with the first
# tokens exact (their outlier values would widen the first key group's range).
PRESETS["kivi4_sink"] = CompressionPolicy(
    "kivi4_sink",
    quantization=replace(_KIVI4, sink_tokens=4),
    description="KIVI-style 4-bit keys and values, groups of 32, first 4 tokens exact",
)
# Written by `minicache-worker calibrate` on the bundled model (see docs/results.md).
PRESETS["default"] = replace(
    CompressionPolicy.from_json(_DEFAULT_POLICY_FILE.read_text()), name="default"
)
FALLBACK_POLICY = "kivi4_sink"


def policy_for_model(policy: CompressionPolicy, shape: ModelShape) -> CompressionPolicy:
    """The policy to use for a model of `shape`.

    `default` is calibrated for the bundled model; for any other model it becomes the
    uncalibrated `FALLBACK_POLICY` (which fits every depth). Any other policy is
    returned as it is, or refused with ValueError when it does not fit the model."""
    reason = policy.unfit_reason(shape)
    if reason is None:
        return policy
    if policy.name == "default":
        return PRESETS[FALLBACK_POLICY]
    raise ValueError(reason)


def request_policy(name_or_json: str) -> CompressionPolicy:
    """A policy sent in a request: a preset name or policy JSON, never a path (a server
    does not read files a client names)."""
    if name_or_json in PRESETS:
        return PRESETS[name_or_json]
    if name_or_json.lstrip().startswith("{"):
        return CompressionPolicy.from_json(name_or_json)
    raise ValueError(
        f"unknown policy {name_or_json!r}: send one of {', '.join(PRESETS)} or a policy as JSON"
    )


def load_policy(name_or_path: str) -> CompressionPolicy:
    """A preset by name, or a policy JSON file by path."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"policy file {name_or_path!r} does not exist")
        return CompressionPolicy.from_json(path.read_text())
    raise ValueError(
        f"unknown policy {name_or_path!r}: use a preset ({', '.join(PRESETS)}) "
        "or the path of a policy JSON file"
    )
