"""Compression policies: validation, JSON round trip, presets, layer groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicache_client.policy import (
    PRESETS,
    CompressionPolicy,
    LayerBits,
    MergePlan,
    ModelShape,
    PairMerge,
    Quantization,
    Retention,
    TransformPlan,
    load_policy,
    policy_for_model,
    request_policy,
)
from minicache_client.transform_artifact import (
    ARTIFACT_SUFFIX,
    BUNDLED_DIRECTORY,
    decode_artifact,
)

CUSTOM = CompressionPolicy(
    "custom_pairs",
    merge=MergePlan(
        pairs=(
            PairMerge(
                4, values=False, t=0.3, retention=Retention(fraction=0.25, side="least_distinct")
            ),
            PairMerge(1, method="average", retention=None, window=16),
        )
    ),
    quantization=Quantization(
        3,
        2,
        key_group_size=64,
        value_group_size=16,
        window=8,
        sink_tokens=4,
        full_precision_layers=(0, 7),
        layer_bits=(LayerBits(2, 4, None), LayerBits(5, 2, 3)),
    ),
    description="explicit pairs",
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name: str) -> None:
    policy = PRESETS[name]
    assert policy.name == name
    text = policy.to_json()
    assert json.loads(text)["name"] == name
    assert CompressionPolicy.from_json(text) == policy
    assert CompressionPolicy.from_dict(policy.to_dict()) == policy


def test_custom_policy_round_trips_through_json() -> None:
    restored = CompressionPolicy.from_json(CUSTOM.to_json())
    assert restored == CUSTOM
    assert isinstance(restored.merge.pairs, tuple)
    assert isinstance(restored.quantization.full_precision_layers, tuple)
    assert restored.quantization.layer_bits == (LayerBits(2, 4, None), LayerBits(5, 2, 3))


def test_layer_bits_override_the_policy_wide_bits() -> None:
    q = CUSTOM.quantization
    assert [q.bits_for("keys", layer) for layer in (0, 1, 2, 5)] == [None, 3, 4, 2]
    assert [q.bits_for("values", layer) for layer in (0, 1, 2, 5)] == [None, 2, None, 3]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LayerBits(1, 5, 2), "layer 1 key_bits must be one of"),
        (lambda: LayerBits(-1, 2, 2), "layer must be >= 0"),
        (
            lambda: Quantization(layer_bits=(LayerBits(1, 2, 2), LayerBits(1, 4, 4))),
            "names a layer twice",
        ),
    ],
)
def test_bad_layer_bits_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_quantization_naming_missing_layers_is_refused() -> None:
    policy = CompressionPolicy(quantization=Quantization(layer_bits=(LayerBits(30, 2, 2),)))
    with pytest.raises(ValueError, match=r"names layers \[30\]; the model has 30"):
        policy.resolve_layer_groups(30)
    assert len(policy.resolve_layer_groups(31)) == 31


def test_presets_hold_the_paper_defaults() -> None:
    paper = PRESETS["paper"].merge
    assert paper.start_layer is None and paper.t == 0.6 and paper.method == "slerp"
    assert paper.retention == Retention(gamma=0.05, side="most_distinct")
    assert PRESETS["paper_kivi4"].merge == paper
    assert PRESETS["paper_kivi4"].quantization == PRESETS["kivi4"].quantization
    assert PRESETS["kivi4"].quantization.key_bits == PRESETS["kivi4"].quantization.value_bits == 4
    assert PRESETS["kivi2"].quantization.key_bits == PRESETS["kivi2"].quantization.value_bits == 2
    assert PRESETS["average"].merge.method == "average"
    assert PRESETS["none"].merge is None and PRESETS["none"].quantization is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Quantization(key_bits=5), r"key_bits must be one of \(2, 3, 4, 8\)"),
        (lambda: Quantization(value_bits=1), "value_bits must be one of"),
        (lambda: Quantization(key_group_size=0), "key_group_size must be >= 1"),
        (lambda: Quantization(value_group_size=0), "value_group_size must be >= 1"),
        (lambda: Quantization(window=-1), "window must be >= 0"),
        (lambda: Quantization(sink_tokens=-2), "sink_tokens must be >= 0"),
        (lambda: Retention(gamma=1.5), r"gamma must be in \[0, 1\], got 1.5"),
        (lambda: Retention(gamma=-0.1), "gamma must be in"),
        (lambda: Retention(fraction=1.2), "fraction must be in"),
        (
            lambda: Retention(side="foo"),
            r"side must be one of \('most_distinct', 'least_distinct'\), got 'foo'",
        ),
        (lambda: Retention(sink_tokens=-1), "sink_tokens must be >= 0"),
        (lambda: PairMerge(-1), "first_layer must be >= 0"),
        (lambda: PairMerge(0, keys=False, values=False), "keys, values or both"),
        (lambda: PairMerge(0, t=1.1), r"t must be in \[0, 1\]"),
        (lambda: PairMerge(0, method="max"), "merge method must be one of"),
        (lambda: PairMerge(0, window=-1), "merge window must be >= 0, got -1"),
        (lambda: MergePlan(window=-3), "merge window must be >= 0"),
        (lambda: MergePlan(t=-0.5), r"t must be in \[0, 1\]"),
        (lambda: MergePlan(method="mean"), "merge method must be one of"),
        (
            lambda: MergePlan(pairs=(PairMerge(2), PairMerge(3))),
            r"merge pairs overlap: \[\(2, 3\), \(3, 4\)\]",
        ),
        (lambda: MergePlan(pairs=(PairMerge(2), PairMerge(2))), "overlap"),
        (
            lambda: MergePlan(start_layer=2, pairs=(PairMerge(4),)),
            "either start_layer or pairs, not both",
        ),
    ],
)
def test_invalid_values_raise_helpful_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_pair_out_of_range_for_the_model() -> None:
    policy = CompressionPolicy(merge=MergePlan(pairs=(PairMerge(28),)))
    assert [g.layers for g in policy.resolve_layer_groups(30)][-1] == (28, 29)
    with pytest.raises(
        ValueError, match=r"merge pair \(28, 29\) is out of range for a model of 29 layers"
    ):
        policy.resolve_layer_groups(29)


@pytest.mark.parametrize("start", [-1, 30, 31])
def test_start_layer_out_of_range(start: int) -> None:
    with pytest.raises(ValueError, match=f"start_layer {start} is out of range for 30 layers"):
        CompressionPolicy(merge=MergePlan(start_layer=start)).resolve_layer_groups(30)


@pytest.mark.parametrize("num_layers", [0, -3])
def test_model_needs_a_layer(num_layers: int) -> None:
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        PRESETS["none"].resolve_layer_groups(num_layers)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        ('{"merge": {"bogus": 1}}', "malformed compression policy"),
        ('{"quantization": {"key_bits": 5}}', "key_bits must be one of"),
        ('{"merge": {"retention": {"side": "foo"}}}', "side must be one of"),
        ('{"merge": {"pairs": [{"keys": true}]}}', "malformed compression policy"),
    ],
)
def test_malformed_json_raises_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompressionPolicy.from_json(text)


def test_load_policy_by_preset_name() -> None:
    for name in PRESETS:
        assert load_policy(name) is PRESETS[name]


def test_load_policy_of_an_unknown_name_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'") as raised:
        load_policy("nope")
    for name in PRESETS:
        assert name in str(raised.value)


def test_load_policy_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(CUSTOM.to_json())
    assert load_policy(str(path)) == CUSTOM


def test_load_policy_of_a_missing_json_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(str(tmp_path / "missing.json"))


# -- layer groups -------------------------------------------------------------------------------


def test_paper_on_thirty_layers() -> None:
    groups = PRESETS["paper"].resolve_layer_groups(30)
    pairs = [g.layers for g in groups if len(g.layers) == 2]
    assert pairs == [(15, 16), (17, 18), (19, 20), (21, 22), (23, 24), (25, 26), (27, 28)]
    assert groups[-1].layers == (29,) and groups[-1].merge is None
    assert [g.layers for g in groups[:15]] == [(layer,) for layer in range(15)]
    for group in groups:
        if group.merge is not None:
            assert group.merge.t == 0.6 and group.merge.retention.gamma == 0.05
            assert group.merge.layers == group.layers


def test_paper_on_an_even_split() -> None:
    groups = PRESETS["paper"].resolve_layer_groups(8)
    assert [g.layers for g in groups] == [(0,), (1,), (2,), (3,), (4, 5), (6, 7)]


@st.composite
def merge_plans(draw: st.DrawFn) -> tuple[MergePlan | None, int]:
    num_layers = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["none", "start", "pairs"]))
    if kind == "none":
        return None, num_layers
    if kind == "start":
        return MergePlan(start_layer=draw(st.integers(0, num_layers - 1))), num_layers
    firsts = draw(st.sets(st.integers(0, max(0, num_layers - 2)), max_size=10))
    chosen: list[int] = []
    for first in sorted(firsts):
        if first + 1 < num_layers and (not chosen or first > chosen[-1] + 1):
            chosen.append(first)
    pairs = tuple(PairMerge(first) for first in draw(st.permutations(chosen)))
    return MergePlan(pairs=pairs), num_layers


@settings(max_examples=150, deadline=None)
@given(merge_plans())
def test_layer_groups_cover_every_layer_once_in_order(sample: tuple[MergePlan | None, int]) -> None:
    plan, num_layers = sample
    groups = CompressionPolicy(merge=plan).resolve_layer_groups(num_layers)
    layers = [layer for group in groups for layer in group.layers]
    assert layers == list(range(num_layers))
    for group in groups:
        assert len(group.layers) in (1, 2)
        assert (group.merge is not None) == (len(group.layers) == 2)
    if plan is not None and plan.pairs is not None:
        merged = sorted(g.layers for g in groups if g.merge is not None)
        assert merged == sorted(pair.layers for pair in plan.pairs)
    if plan is not None and plan.start_layer is not None:
        firsts = [g.layers[0] for g in groups if g.merge is not None]
        assert firsts == list(range(plan.start_layer, num_layers - 1, 2))


def test_default_preset_is_shipped_and_named_default() -> None:
    """The calibrated policy file is part of the SDK; `default` is always a preset."""
    assert "default" in PRESETS
    default = PRESETS["default"]
    assert default.name == "default"
    assert any(
        part is not None for part in (default.quantization, default.merge, default.transform)
    )
    if default.transform is not None:
        # Its artifact ships in the SDK, under its hash, and verifies.
        digest = default.transform.artifact
        bundled = BUNDLED_DIRECTORY / f"{digest}{ARTIFACT_SUFFIX}"
        artifact = decode_artifact(bundled.read_bytes(), digest)
        assert artifact.shape == default.calibrated_for
        for group in default.transform.groups:
            artifact.group_for(group)
    assert default.min_num_layers <= 30  # calibrated for the bundled model's 30 layers
    assert len(default.resolve_layer_groups(30)) <= 30
    assert "calibrated on smollm2" in default.description


def test_min_num_layers_counts_every_named_layer() -> None:
    assert PRESETS["paper"].min_num_layers == 1  # the paper's rule fits any depth
    assert CUSTOM.min_num_layers == 8  # full_precision_layers names layer 7
    with pytest.raises(ValueError):
        CUSTOM.resolve_layer_groups(CUSTOM.min_num_layers - 1)
    assert CUSTOM.resolve_layer_groups(CUSTOM.min_num_layers)


# -- transform plans ----------------------------------------------------------------------------

DIGEST = "0123456789abcdef" * 4


def test_a_transform_plan_holds_its_groups_as_tuples() -> None:
    plan = TransformPlan(DIGEST, [[0, 1, 2], [5, 6]], sink_tokens=0, window=0)
    assert plan.groups == ((0, 1, 2), (5, 6))
    assert plan.layers == {0, 1, 2, 5, 6}
    assert (plan.sink_tokens, plan.window) == (0, 0)
    defaults = TransformPlan(DIGEST, ((3,),))
    assert (defaults.sink_tokens, defaults.window) == (16, 32)


@pytest.mark.parametrize(
    "artifact",
    [
        "",
        DIGEST[:-1],
        DIGEST + "0",
        DIGEST.upper(),
        "g" + DIGEST[1:],
        " " + DIGEST[1:],
        None,
        7,
        DIGEST.encode(),
    ],
)
def test_a_transform_plan_names_its_artifact_by_sha256(artifact) -> None:
    with pytest.raises(ValueError, match="SHA-256 hash in hex"):
        TransformPlan(artifact, ((0, 1),))


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ((), "non-empty layer groups"),
        (((0, 1), ()), "non-empty layer groups"),
        (((0, 1), (1, 2)), "overlap"),
        (((0, 1), (0, 1)), "overlap"),
        (((2, 2),), "overlap"),
        (((0, 2),), "consecutive layers, got \\(0, 2\\)"),
        (((3, 2),), "consecutive layers"),
        (((0, 1), (4, 3, 5)), "consecutive layers"),
        (((-1, 0),), "transform group layer must be >= 0"),
        (((0, 1.0),), "an integer"),
        (((True, 2),), "an integer"),
        (((0, "1"),), "an integer"),
    ],
)
def test_invalid_transform_groups_are_refused(groups, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransformPlan(DIGEST, groups)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sink_tokens": -1}, "transform sink_tokens must be >= 0"),
        ({"window": -1}, "transform window must be >= 0"),
        ({"window": 2.0}, "an integer"),
        ({"sink_tokens": None}, "an integer"),
    ],
)
def test_invalid_transform_counts_are_refused(fields, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransformPlan(DIGEST, ((0, 1),), **fields)


def test_transform_groups_resolve_among_merges_and_single_layers() -> None:
    policy = CompressionPolicy(
        "mixed",
        transform=TransformPlan(DIGEST, ((5, 6), (0, 1, 2))),
        merge=MergePlan(pairs=(PairMerge(3), PairMerge(8))),
        quantization=Quantization(4, 4),
    )
    groups = policy.resolve_layer_groups(11)
    assert [group.layers for group in groups] == [
        (0, 1, 2),
        (3, 4),
        (5, 6),
        (7,),
        (8, 9),
        (10,),
    ]
    for group in groups:
        is_transformed = group.layers in policy.transform.groups
        assert (group.transform is policy.transform) == is_transformed
        assert group.merge is None or not is_transformed
    assert not policy.stores_raw
    assert policy.min_num_layers == 10  # pair (8, 9)
    assert CompressionPolicy(transform=TransformPlan(DIGEST, ((0, 1),))).min_num_layers == 2


@pytest.mark.parametrize(
    "merge",
    [
        MergePlan(pairs=(PairMerge(2),)),  # (2, 3) meets group (0, 1, 2)
        MergePlan(pairs=(PairMerge(4),)),  # (4, 5) meets group (5, 6)
        MergePlan(start_layer=4),  # (4, 5), (6, 7), ...
    ],
)
def test_a_layer_cannot_be_both_merged_and_transform_coded(merge: MergePlan) -> None:
    policy = CompressionPolicy(transform=TransformPlan(DIGEST, ((0, 1, 2), (5, 6))), merge=merge)
    with pytest.raises(ValueError, match="both merged and transform coded"):
        policy.resolve_layer_groups(12)
    assert policy.unfit_reason(ModelShape(12, 2, 64)) is not None


def test_transform_groups_beyond_the_model_are_refused() -> None:
    policy = CompressionPolicy("deep", transform=TransformPlan(DIGEST, ((0, 1), (27, 28, 29))))
    assert len(policy.resolve_layer_groups(30)) == 27
    with pytest.raises(ValueError, match="transform groups name layers up to 29; the model has 29"):
        policy.resolve_layer_groups(29)
    assert policy.min_num_layers == 30
    assert policy_for_model(policy, ModelShape(30, 3, 64)) is policy
    with pytest.raises(ValueError, match="up to 29"):
        policy_for_model(policy, ModelShape(24, 2, 64))


def test_a_transform_policy_round_trips_through_json() -> None:
    policy = CompressionPolicy(
        "transform_json",
        transform=TransformPlan(DIGEST, ((0, 1, 2), (5, 6)), sink_tokens=4, window=0),
        quantization=Quantization(4, 2, window=8),
        calibrated_for=ModelShape(30, 3, 64),
        description="transform coded groups",
    )
    text = policy.to_json()
    plain = json.loads(text)
    assert plain["transform"] == {
        "artifact": DIGEST,
        "groups": [[0, 1, 2], [5, 6]],
        "sink_tokens": 4,
        "window": 0,
    }
    restored = CompressionPolicy.from_json(text)
    assert restored == policy
    assert restored.transform.groups == ((0, 1, 2), (5, 6))
    assert CompressionPolicy.from_dict(policy.to_dict()) == policy
    assert request_policy(text) == policy
    assert CompressionPolicy.from_json(CompressionPolicy("plain").to_json()).transform is None


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ({"groups": [[0, 1]]}, "malformed compression policy"),  # no artifact
        ({"artifact": DIGEST}, "malformed compression policy"),  # no groups
        ({"artifact": DIGEST, "groups": [[0, 1]], "depth": 2}, "malformed compression policy"),
        ({"artifact": DIGEST, "groups": 3}, "malformed compression policy"),
        ({"artifact": DIGEST, "groups": [3]}, "malformed compression policy"),
        ({"artifact": DIGEST, "groups": [[0, 2]]}, "consecutive layers"),
        ({"artifact": DIGEST, "groups": [[0, 1.5]]}, "an integer"),
        ({"artifact": DIGEST.upper(), "groups": [[0, 1]]}, "SHA-256"),
        ({"artifact": DIGEST, "groups": [[0, 1]], "window": -4}, "window must be >= 0"),
        ([1, 2], "malformed compression policy"),
        (7, "malformed compression policy"),
    ],
)
def test_malformed_transform_json_raises_value_error(transform, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompressionPolicy.from_json(json.dumps({"name": "x", "transform": transform}))
