"""The KV bank (deploy/loadtest/kv_bank.py): real SmolLM2 KV of ShareGPT text, built
once into files and read back, equal to the model's own cache of the same tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from minicache_worker.models import LoadedModel

LOADTEST = Path(__file__).resolve().parents[2] / "deploy" / "loadtest"
TOKENS = 64


@pytest.fixture(scope="module")
def kv_bank_module():
    spec = importlib.util.spec_from_file_location("kv_bank", LOADTEST / "kv_bank.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kv_bank"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("kv_bank", None)


@pytest.mark.model
def test_bank_is_built_once_and_holds_the_models_cache(kv_bank_module, lm: LoadedModel, tmp_path):
    bank = kv_bank_module.KVBank.load_or_build(1, TOKENS, tmp_path, loaded_model=lm)
    assert bank.built_now
    assert (bank.num_layers, bank.kv_heads, bank.head_dim) == (
        lm.num_layers,
        lm.kv_heads,
        lm.head_dim,
    )
    assert bank.manifest["tokens"] == TOKENS and len(bank.manifest["texts_sha256"]) == 64

    layers = bank.span(0, 8, 40)
    assert len(layers) == lm.num_layers
    for keys, values in layers:
        assert keys.shape == values.shape == (lm.kv_heads, 32, lm.head_dim)
        assert keys.dtype == values.dtype == np.float16

    # The model's own cache of the bank's tokens, from position 0.
    ids = bank.token_ids(0)
    assert ids.shape == (TOKENS,)
    cache = DynamicCache()
    with torch.inference_mode():
        lm.model(torch.from_numpy(ids)[None], past_key_values=cache, use_cache=True)
    for (keys, values), layer in zip(bank.conversation(0).layers, cache.layers, strict=True):
        np.testing.assert_array_equal(keys, layer.keys[0].to(torch.float16).numpy())
        np.testing.assert_array_equal(values, layer.values[0].to(torch.float16).numpy())

    # A second load reads the files: no model is given or loaded, nothing is rewritten.
    files = {path: path.stat().st_mtime_ns for path in bank.directory.iterdir()}
    again = kv_bank_module.KVBank.load_or_build(1, TOKENS, tmp_path)
    assert not again.built_now and again.directory == bank.directory
    assert {path: path.stat().st_mtime_ns for path in again.directory.iterdir()} == files
    np.testing.assert_array_equal(again.span(0, 0, TOKENS)[5][0], bank.span(0, 0, TOKENS)[5][0])


@pytest.mark.model
def test_bank_refuses_bad_ranges(kv_bank_module, lm: LoadedModel, tmp_path):
    bank = kv_bank_module.KVBank.load_or_build(1, TOKENS, tmp_path, loaded_model=lm)
    for start, end in ((0, TOKENS + 1), (5, 5), (-1, 3)):
        with pytest.raises(ValueError, match="cut conversations"):
            bank.span(0, start, end)
    with pytest.raises(ValueError, match=r"conversations 0\.\.0"):
        bank.conversation(1)
    with pytest.raises(ValueError, match="must be >= 1"):
        kv_bank_module.KVBank.load_or_build(0, TOKENS, tmp_path)
