"""Put and prefetch through real gRPC on loopback.

Policy `none` is bit-exact in every dtype and both wire forms; with a compressing policy
the service returns exactly what the engine restores offline from the same input and the
same sequence of puts, extensions and appends.
"""

from __future__ import annotations

import numpy as np
import pytest
from service_fixtures import ServerThread, kv_layers, settings_for

from minicache_client import CacheClient, ClientConfig
from minicache_client.array_namespace import narrow_from_float32
from minicache_client.policy import load_policy
from minicache_client.sequence_encoder import SequenceEncoder

# The bundled model's KV shape: the calibrated `default` policy names its layer pairs.
LAYERS, HEADS, DIM = 30, 3, 64
WIRE_FORMS = ("restored", "compressed")


@pytest.fixture(scope="module")
def server():
    running = ServerThread(settings_for(max_chunk_bytes=64 * 1024))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    # Chunks far below a layer's size: every layer crosses several messages. A long
    # deadline: the transform default codes random KV (large codes) on a CPU that CI
    # may share with other jobs.
    with CacheClient(
        ClientConfig(target=server.address, insecure=True, max_chunk_bytes=64 * 1024, timeout_s=120)
    ) as client:
        yield client


def _carried(layers, dtype: str):
    return [
        (
            narrow_from_float32(k.astype(np.float32), dtype),
            narrow_from_float32(v.astype(np.float32), dtype),
        )
        for k, v in layers
    ]


@pytest.mark.parametrize("wire_form", WIRE_FORMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_policy_none_is_bit_exact(client, dtype, wire_form) -> None:
    layers = _carried(kv_layers(LAYERS, 300, HEADS, DIM, np.float32, seed=1), dtype)
    sequence = f"exact-{dtype}-{wire_form}"
    result = client.put("m", sequence, layers, dtype=dtype, policy="none")
    assert result.tokens == 300
    assert result.fp16_bytes == LAYERS * 2 * HEADS * 300 * DIM * 2
    received = list(client.prefetch("m", sequence, wire_form=wire_form))
    assert [layer for layer, _, _ in received] == list(range(LAYERS))
    for (layer, keys, values), (sent_keys, sent_values) in zip(received, layers, strict=True):
        assert keys.dtype == sent_keys.dtype and keys.shape == sent_keys.shape
        assert keys.tobytes() == sent_keys.tobytes(), f"layer {layer} keys differ"
        assert values.tobytes() == sent_values.tobytes(), f"layer {layer} values differ"


def test_token_and_layer_ranges(client) -> None:
    layers = kv_layers(LAYERS, 200, HEADS, DIM, seed=2)
    client.put("m", "ranges", layers, dtype="float16", policy="none")
    received = list(
        client.prefetch("m", "ranges", start_token=50, end_token=120, first_layer=3, last_layer=7)
    )
    assert [layer for layer, _, _ in received] == [3, 4, 5, 6, 7]
    for layer, keys, values in received:
        np.testing.assert_array_equal(keys, layers[layer][0][:, 50:120])
        np.testing.assert_array_equal(values, layers[layer][1][:, 50:120])


def _offline(policy_name: str, steps, dtype: str = "float16") -> SequenceEncoder:
    encoder = SequenceEncoder(
        load_policy(policy_name), num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, dtype=dtype
    )
    for layers, seal in steps:
        for index, (keys, values) in enumerate(layers):
            encoder.put_layer(index, keys, values, seal=seal)
    return encoder


@pytest.mark.parametrize("wire_form", WIRE_FORMS)
@pytest.mark.parametrize("policy", ["default", "paper_kivi4", "kivi2", "paper"])
def test_compressing_policy_equals_offline_engine(client, policy, wire_form) -> None:
    """A prefill (sealed), a second turn's extension and two decode-step appends."""
    full = kv_layers(LAYERS, 230, HEADS, DIM, seed=3)
    prefill = [(k[:, :160], v[:, :160]) for k, v in full]
    turn = [(k[:, 160:220], v[:, 160:220]) for k, v in full]
    steps = [[(k[:, t : t + 5], v[:, t : t + 5]) for k, v in full] for t in (220, 225)]
    sequence = f"{policy}-{wire_form}"
    client.put("m", sequence, prefill, dtype="float16", policy=policy, seal=True)
    client.put("m", sequence, turn, dtype="float16", start_token=160)
    for index, step in enumerate(steps):
        result = client.append("m", sequence, step, dtype="float16", start_token=220 + 5 * index)
    assert result.tokens == 230
    offline = _offline(
        policy, [(prefill, True), (turn, False), (steps[0], False), (steps[1], False)]
    )
    assert result.fp16_bytes == offline.fp16_bytes()
    assert result.compression_ratio > 1.2  # paper merges half the layers: the least
    for layer, keys, values in client.prefetch("m", sequence, wire_form=wire_form):
        expected_keys, expected_values = offline.restore_layer(layer, 0, 230, "float16")
        np.testing.assert_array_equal(keys, expected_keys, err_msg=f"layer {layer} keys")
        np.testing.assert_array_equal(values, expected_values, err_msg=f"layer {layer} values")
    # The compressed form restores into another dtype on the client.
    layer, keys, _ = next(
        client.prefetch("m", sequence, wire_form="compressed", dtype="float32", start_token=100)
    )
    np.testing.assert_array_equal(keys, offline.restore_layer(layer, 100, 230, "float32")[0])


def test_replace_from_token_zero(client) -> None:
    first = kv_layers(LAYERS, 40, HEADS, DIM, seed=4)
    second = kv_layers(LAYERS, 25, HEADS, DIM, seed=5)
    client.put("m", "replaced", first, dtype="float16", policy="kivi4")
    client.put("m", "replaced", second, dtype="float16", policy="none")
    held = client.lookup("m", "replaced")
    assert held.tokens == 25
    layers = client.prefetch_layers("m", "replaced")
    assert all(
        np.array_equal(keys, sent[0]) for (keys, _), sent in zip(layers, second, strict=True)
    )


def test_streamed_put_layer_by_layer(client) -> None:
    layers = kv_layers(LAYERS, 90, HEADS, DIM, seed=6)
    with client.open_put(
        "m",
        "streamed",
        num_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        dtype="float16",
        end_token=90,
        policy="none",
    ) as stream:
        for index, (keys, values) in enumerate(layers):
            stream.send_layer(index, keys, values)
    assert stream.result.tokens == 90
    received = client.prefetch_layers("m", "streamed")
    assert all(np.array_equal(k, s[0]) for (k, _), s in zip(received, layers, strict=True))


def test_delete_then_miss(client) -> None:
    from minicache_client import NotFoundError

    client.put("m", "deleted", kv_layers(LAYERS, 10, HEADS, DIM), dtype="float16")
    assert client.delete("m", "deleted") is True
    assert client.delete("m", "deleted") is False
    with pytest.raises(NotFoundError):
        client.lookup("m", "deleted")
    with pytest.raises(NotFoundError):
        list(client.prefetch("m", "deleted"))


def test_default_policy_falls_back_for_other_models(client) -> None:
    """The shipped default is calibrated for the bundled model's 30 layers x 3 KV heads
    x 64 dims: another depth, or the same depth with other heads, gets `kivi4_sink`."""
    client.put("m8", "fallback", kv_layers(8, 40, HEADS, DIM), dtype="float16")
    assert '"name": "kivi4_sink"' in client.lookup("m8", "fallback").policy
    client.put("m30", "fallback", kv_layers(LAYERS, 40, 2, DIM), dtype="float16")
    assert '"name": "kivi4_sink"' in client.lookup("m30", "fallback").policy
    client.put("m8", "named", kv_layers(8, 40, HEADS, DIM), dtype="float16", policy="default")
    assert '"name": "kivi4_sink"' in client.lookup("m8", "named").policy
    client.put("m", "calibrated", kv_layers(LAYERS, 40, HEADS, DIM), dtype="float16")
    assert '"name": "default"' in client.lookup("m", "calibrated").policy
