"""The compressed transformers cache against the model's own cache, on the real model."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from minicache_client.policy import PRESETS
from minicache_worker.compressed_cache import CompressedCache, CompressedLayer
from minicache_worker.evaluation import SequenceRun
from minicache_worker.texts import split_text

PREFIX, STEPS = 96, 6


def test_transformers_cache_contract_we_rely_on() -> None:
    """The methods CompressedLayer overrides or calls keep their 5.x shape."""
    for name in ("update", "get_seq_length", "get_mask_sizes", "lazy_initialization", "crop"):
        assert callable(getattr(DynamicLayer, name)), name
    update = inspect.signature(DynamicLayer.update).parameters
    assert list(update)[:3] == ["self", "key_states", "value_states"]
    assert list(inspect.signature(DynamicLayer.lazy_initialization).parameters)[1:3] == [
        "key_states",
        "value_states",
    ]
    assert "layers" in inspect.signature(Cache.__init__).parameters
    assert issubclass(CompressedLayer, DynamicLayer)


@pytest.fixture(scope="module")
def ids(lm) -> torch.Tensor:
    text = split_text("evaluation")[:4000]
    return lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


@torch.inference_mode()
def _logits(lm, cache, ids: torch.Tensor) -> list[torch.Tensor]:
    """Log-probabilities after the prefix and after each of STEPS single-token steps."""
    out = [lm.model(ids[None, :PREFIX], past_key_values=cache, use_cache=True).logits[0, -1]]
    for step in range(STEPS):
        token = ids[None, PREFIX + step : PREFIX + step + 1]
        out.append(lm.model(token, past_key_values=cache, use_cache=True).logits[0, -1])
    return [torch.log_softmax(logits, -1) for logits in out]


@pytest.fixture(scope="module")
def native(lm, ids: torch.Tensor) -> list[torch.Tensor]:
    """What the model's own cache gives for the same tokens."""
    return _logits(lm, DynamicCache(), ids)


@pytest.mark.model
def test_uncompressed_policy_matches_the_models_own_cache(lm, ids, native) -> None:
    run = SequenceRun(lm, PRESETS["none"])
    ours = _logits(lm, run.cache, ids)
    for step, (a, b) in enumerate(zip(native, ours, strict=True)):
        # History goes through the store at fp16: agreement within fp16 rounding.
        assert float((a - b).abs().max()) < 0.05, step
        assert int(a.argmax()) == int(b.argmax()), step
    assert run.store.entry_for(0).tokens == PREFIX + STEPS
    assert run.cache.get_seq_length() == PREFIX + STEPS


@pytest.mark.model
@pytest.mark.parametrize("preset", ["kivi4", "paper"])
def test_model_attends_to_exactly_what_the_store_restores(lm, ids, preset: str) -> None:
    run = SequenceRun(lm, PRESETS[preset])
    _logits(lm, run.cache, ids)
    # One more step: every layer refreshes its history from the store first.
    with torch.inference_mode():
        run.forward(ids[PREFIX + STEPS : PREFIX + STEPS + 1])
    for layer in (0, 15, 16, 29):
        keys, values = run.store.restore_layer(layer, 0, PREFIX + STEPS, "float16")
        cached = run.cache.layers[layer]
        np.testing.assert_array_equal(
            cached.keys[0, :, : PREFIX + STEPS].numpy(), np.asarray(keys, dtype=np.float16)
        )
        np.testing.assert_array_equal(
            cached.values[0, :, : PREFIX + STEPS].numpy(), np.asarray(values, dtype=np.float16)
        )


@pytest.mark.model
def test_compression_changes_the_output_and_shrinks_the_store(lm, ids, native) -> None:
    run = SequenceRun(lm, PRESETS["kivi2"])
    ours = _logits(lm, run.cache, ids)
    assert max(float((a - b).abs().max()) for a, b in zip(native, ours, strict=True)) > 0.05
    assert run.store.compression_ratio() > 2.0


@pytest.mark.model
def test_batch_of_two_and_crop_are_refused(lm) -> None:
    run = SequenceRun(lm, PRESETS["none"])
    with pytest.raises(ValueError, match="batch size must be 1"), torch.inference_mode():
        lm.model(torch.zeros((2, 4), dtype=torch.long), past_key_values=run.cache)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        run.cache.crop(1)


def test_cache_has_one_layer_per_model_layer() -> None:
    from minicache_client.sequence_encoder import SequenceEncoder

    store = SequenceEncoder(PRESETS["none"], num_layers=4, kv_heads=1, head_dim=8, dtype="float16")
    cache = CompressedCache(store, 4)
    assert [layer.layer_idx for layer in cache.layers] == [0, 1, 2, 3]
