"""Appends write behind the held tokens instead of copying the history."""

from __future__ import annotations

import numpy as np

from minicache_client.codecs.base import extend_tokens, has_spare_room
from minicache_client.codecs.raw import RawStream


def tokens(count: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + count * 2 * 4, dtype=np.float32).reshape(2, count, 4)


def test_appends_reuse_one_buffer_until_it_is_full():
    held, backing = extend_tokens(tokens(0), tokens(100), None)
    buffer = backing[0]
    assert buffer.shape[1] == 100 + 16  # an eighth of 100 is below the 16-token floor
    for step in range(16):
        held, backing = extend_tokens(held, tokens(1, 1000 + step), backing)
        assert backing[0] is buffer and has_spare_room(held)
    held, backing = extend_tokens(held, tokens(1, 5000), backing)
    assert backing[0] is not buffer and backing[0].shape[1] == 117 + 16
    expected = np.concatenate(
        [tokens(100)] + [tokens(1, 1000 + step) for step in range(16)] + [tokens(1, 5000)], axis=1
    )
    assert np.array_equal(held, expected)


def test_a_replaced_array_gets_a_new_buffer_and_the_caller_is_never_aliased():
    chunk = tokens(10)
    held, backing = extend_tokens(tokens(0), chunk, None)
    chunk[:] = -1  # the caller's buffer changes; the held tokens do not
    assert np.array_equal(held, tokens(10))
    replaced = held.copy()  # e.g. moved to another device: not the view handed out
    again, new_backing = extend_tokens(replaced, tokens(1, 77), backing)
    assert new_backing[0] is not backing[0]
    assert np.array_equal(again[:, :10], tokens(10)) and np.array_equal(
        again[:, 10:], tokens(1, 77)
    )


def test_spare_room_is_only_the_view_handed_out():
    held, _ = extend_tokens(tokens(0), tokens(8), None)
    assert has_spare_room(held)
    assert not has_spare_room(held.copy())
    assert not has_spare_room(held[:, 1:])  # not a prefix
    assert not has_spare_room(held[:1])  # fewer heads than its buffer
    frozen = held.view()
    frozen.flags.writeable = False
    assert not has_spare_room(frozen)


def test_a_raw_stream_appended_token_by_token_equals_one_chunk():
    stream, whole = (RawStream(kv_heads=2, head_dim=4, dtype="float32") for _ in range(2))
    whole.append([tokens(50)])
    for step in range(50):
        stream.append([tokens(50)[:, step : step + 1]])
    assert np.array_equal(stream.values, whole.values)
    assert np.array_equal(stream.restore(0, 3, 40, "float32"), tokens(50)[:, 3:40])
