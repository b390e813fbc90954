"""Model loading: bundled, local GGUF, local HF directory; unsupported models refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicache_worker.models import (
    UnsupportedModelError,
    check_architecture,
    load_model,
    resolve_model_source,
)


def _config_dir(tmp_path: Path, **config: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bundled_model_resolves_to_the_gguf_in_the_wheel() -> None:
    folder, kwargs = resolve_model_source("smollm2")
    assert (Path(folder) / kwargs["gguf_file"]).is_file()
    assert kwargs["gguf_file"].endswith(".gguf")


def test_local_gguf_path_resolves_to_its_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), {"gguf_file": "tiny.gguf"})


@pytest.mark.parametrize("spec", ["gpt-5", "/no/such/model", "model.safetensors"])
def test_unknown_model_names_the_accepted_forms(spec: str) -> None:
    with pytest.raises(UnsupportedModelError, match="bundled name"):
        resolve_model_source(spec)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"config\.json"):
        resolve_model_source(str(tmp_path))


def test_non_llama_architecture_is_refused(tmp_path: Path) -> None:
    folder = _config_dir(tmp_path, model_type="gpt2", n_layer=2, n_head=2, n_embd=8)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        load_model(str(folder))


def test_sliding_window_models_are_accepted() -> None:
    """The compressed cache keeps every layer's history and the model masks sliding
    layers by position (tests/worker/test_gemma3.py proves the logits equal)."""
    from transformers import MistralConfig, Qwen2Config

    check_architecture(MistralConfig(num_hidden_layers=2, sliding_window=16))
    check_architecture(
        Qwen2Config(
            num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2
        )
    )


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("gemma3n", "KV sharing"),
        ("gemma4", "different head size"),
        ("deepseek_v3", "latent"),
        ("mamba", "recurrent"),
        ("bert", "not been checked"),
    ],
)
def test_refused_model_types_say_why(model_type: str, reason: str) -> None:
    class Config:
        def get_text_config(self, decoder: bool = True) -> Config:
            return self

    config = Config()
    config.model_type = model_type
    with pytest.raises(UnsupportedModelError, match=reason) as refused:
        check_architecture(config)
    assert "supported types" in str(refused.value)


def test_chunked_attention_is_refused_with_the_reason() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2)
    config.attention_chunk_size = 128
    with pytest.raises(UnsupportedModelError, match="attention_chunk_size"):
        check_architecture(config)


def test_unreadable_config_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="cannot read the model configuration"):
        load_model(str(folder))


@pytest.mark.model
def test_bundled_model_shape(lm) -> None:
    assert (lm.num_layers, lm.kv_heads, lm.head_dim) == (30, 3, 64)
