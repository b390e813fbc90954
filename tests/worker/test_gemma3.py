"""Gemma-3 (sliding and full layers, a RoPE theta per kind, QK-norm, one KV head):
accepted, RoPE tables per layer kind, and sliding layers attend correctly through the
compressed cache, which holds every layer's whole history.

The unit tests build tiny random models from a config in memory (no download); the
tests marked `model` use Gemma-3-270M, from $MINICACHE_GEMMA3_GGUF or where
deploy/models/gemma3.sh puts it by default, and are skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from minicache_client.policy import PRESETS
from minicache_worker.evaluation import EvalSettings, Evaluator, SequenceRun
from minicache_worker.models import (
    GEMMA3_CHAT_TEMPLATE,
    LoadedModel,
    UnsupportedModelError,
    check_architecture,
    layer_kinds,
    load_model,
    rope_tables,
)
from minicache_worker.transform_calibration import layer_groups

S, F = "sliding_attention", "full_attention"
TINY_KINDS = [S, S, F, S, S, F]
WINDOW, PROMPT, STEPS = 8, 40, 6
FULL_THETA, SLIDING_THETA = 1_000_000.0, 100.0


def _tiny_gemma3(dtype: torch.dtype = torch.float32, **overrides: object) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        **{
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": len(TINY_KINDS),
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "sliding_window": WINDOW,
            "layer_types": TINY_KINDS,
            "rope_parameters": {
                F: {"rope_type": "default", "rope_theta": FULL_THETA},
                S: {"rope_type": "default", "rope_theta": SLIDING_THETA},
            },
            "max_position_embeddings": 256,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **overrides,
        }
    )
    return Gemma3ForCausalLM(config).to(dtype).eval()


def _tiny_mistral(dtype: torch.dtype) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=WINDOW,
        max_position_embeddings=256,
    )
    return MistralForCausalLM(config).to(dtype).eval()


def _tiny_qwen2(dtype: torch.dtype) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,  # layers 2 and 3 slide
        max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(config).to(dtype).eval()


def _loaded(model) -> LoadedModel:
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return LoadedModel(
        "tiny", model, None, text.num_hidden_layers, text.num_key_value_heads, head_dim
    )


@torch.inference_mode()
def _log_probs(model, cache, ids: torch.Tensor, prompt: int, steps: int) -> torch.Tensor:
    """Log-probabilities of every prompt position, then of `steps` single-token steps."""
    out = [model(ids[None, :prompt], past_key_values=cache, use_cache=True).logits[0]]
    for position in range(prompt, prompt + steps):
        token = ids[None, position : position + 1]
        out.append(model(token, past_key_values=cache, use_cache=True).logits[0])
    return torch.log_softmax(torch.cat(out).float(), dim=-1)


def _ids(vocab: int, count: int) -> torch.Tensor:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(1))


# -- architecture checks and layer kinds ----------------------------------------------


def test_gemma3_text_config_is_accepted() -> None:
    check_architecture(_tiny_gemma3().config)


def test_multimodal_gemma3_config_is_checked_by_its_text_part() -> None:
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"num_hidden_layers": 2, "layer_types": [S, F]})
    check_architecture(config)


def test_bidirectional_gemma3_is_refused_with_the_reason() -> None:
    config = _tiny_gemma3().config
    config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectionally"):
        check_architecture(config)


def test_a_layer_kind_that_is_not_attention_is_refused() -> None:
    config = _tiny_gemma3().config
    config.layer_types = [*TINY_KINDS[:-1], "linear_attention"]
    with pytest.raises(UnsupportedModelError, match=r"layer 5 is a 'linear_attention' layer"):
        check_architecture(config)


def test_layer_kinds_are_the_configs_layer_types() -> None:
    lm = _loaded(_tiny_gemma3())
    assert layer_kinds(lm) == tuple(TINY_KINDS)
    # Transform groups never mix kinds.
    assert layer_groups(layer_kinds(lm), 10) == ((0, 1), (2,), (3, 4), (5,))


def test_layer_kinds_of_models_without_layer_types() -> None:
    assert layer_kinds(_loaded(_tiny_mistral(torch.float32))) == (S, S, S)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert layer_kinds(_loaded(llama)) == (F, F)


def test_gemma3_fallback_chat_template_is_gemmas_turn_format() -> None:
    import jinja2

    rendered = (
        jinja2.Environment()
        .from_string(GEMMA3_CHAT_TEMPLATE)
        .render(
            bos_token="<bos>",
            add_generation_prompt=True,
            messages=[
                {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Key?"},
            ],
        )
    )
    assert rendered == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nKey?<end_of_turn>\n<start_of_turn>model\n"
    )


# -- RoPE tables per layer kind ---------------------------------------------------------


def test_rope_tables_follow_each_layers_theta() -> None:
    lm = _loaded(_tiny_gemma3())
    tables = rope_tables(lm)
    dims = np.arange(0, 32, 2, dtype=np.float32) / 32
    for kind, table in zip(TINY_KINDS, tables, strict=True):
        theta = FULL_THETA if kind == F else SLIDING_THETA
        np.testing.assert_allclose(table.inv_freq, 1.0 / theta**dims, rtol=1e-6)
        assert table.attention_scaling == 1.0


def test_rope_tables_rotate_keys_as_the_model_does() -> None:
    """Each layer's table reproduces the model's own RoPE for that layer's kind."""
    model = _tiny_gemma3()
    tables = rope_tables(_loaded(model))
    keys = torch.randn(1, 1, 20, 32, generator=torch.Generator().manual_seed(2))
    first = 7
    positions = torch.arange(first, first + 20)[None]
    for kind, table in zip(TINY_KINDS, tables, strict=True):
        cos, sin = model.model.rotary_emb(keys, positions, kind)
        expected, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        ours = table.rotate(keys[0].numpy(), first)
        np.testing.assert_allclose(ours, expected[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(table.rotate(ours, first, inverse=True), keys[0], atol=1e-5)


def test_rope_tables_of_a_single_theta_model_are_its_inv_freq() -> None:
    """Llama-like models (SmolLM2): one table, the rotary embedding's, for every layer."""
    model = _tiny_mistral(torch.float32)
    tables = rope_tables(_loaded(model))
    assert len(tables) == 3
    for table in tables:
        np.testing.assert_array_equal(table.inv_freq, model.model.rotary_emb.inv_freq.numpy())


# -- sliding layers through the compressed cache ----------------------------------------


def test_model_caches_drop_what_ours_keeps() -> None:
    """The premise: transformers' own cache keeps only the window on sliding layers; the
    compressed cache keeps every layer's whole history, and the mask does the rest."""
    model = _tiny_gemma3()
    run = SequenceRun(_loaded(model), PRESETS["none"])
    native = DynamicCache(config=model.config)
    ids = _ids(128, PROMPT + STEPS)
    _log_probs(model, native, ids, PROMPT, STEPS)
    _log_probs(model, run.cache, ids, PROMPT, STEPS)
    for layer, kind in enumerate(TINY_KINDS):
        assert isinstance(native.layers[layer], DynamicSlidingWindowLayer) == (kind == S)
        assert run.cache.layers[layer].keys.shape[-2] == PROMPT + STEPS
    assert native.layers[0].keys.shape[-2] == WINDOW - 1


def _tiny_gemma3_eager(dtype: torch.dtype) -> Gemma3ForCausalLM:
    """What load_model gives a model with sliding layers: eager attention."""
    model = _tiny_gemma3(dtype)
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize(
    "build",
    [_tiny_gemma3, _tiny_gemma3_eager, _tiny_mistral, _tiny_qwen2],
    ids=["gemma3", "gemma3-eager", "mistral", "qwen2"],
)
def test_sliding_layers_match_the_models_own_cache_exactly(build) -> None:
    """In float16 the store holds exactly what it is given: the compressed cache with
    policy none gives the very logits of the model's own (sliding-window) cache, for a
    prompt much longer than the window and decode steps after it."""
    model = build(torch.float16)
    ids = _ids(128, PROMPT + STEPS)
    native = _log_probs(model, DynamicCache(config=model.config), ids, PROMPT, STEPS)
    run = SequenceRun(_loaded(model), PRESETS["none"])
    ours = _log_probs(model, run.cache, ids, PROMPT, STEPS)
    torch.testing.assert_close(ours, native, rtol=0, atol=1e-3)
    assert run.store.entry_for(0).tokens == PROMPT + STEPS


def test_sliding_layers_in_float32_agree_within_fp16_storage() -> None:
    model = _tiny_gemma3(torch.float32)
    ids = _ids(128, PROMPT + STEPS)
    native = _log_probs(model, DynamicCache(config=model.config), ids, PROMPT, STEPS)
    ours = _log_probs(model, SequenceRun(_loaded(model), PRESETS["none"]).cache, ids, PROMPT, 6)
    difference = float((ours - native).abs().max())
    assert difference < 2e-3
    # The check has teeth: attending to the whole history instead of the window
    # changes the logits by far more than that.
    unwindowed = _tiny_gemma3(torch.float32, sliding_window=10_000)
    unwindowed.load_state_dict(model.state_dict())
    wrong = _log_probs(unwindowed, DynamicCache(), ids, PROMPT, STEPS)
    assert float((wrong - native).abs().max()) > 50 * max(difference, 1e-4)
    # Within the first window both agree: only the window makes the difference.
    torch.testing.assert_close(wrong[:WINDOW], native[:WINDOW])


def test_generate_with_the_compressed_cache_matches_plain_generate() -> None:
    model = _tiny_gemma3(torch.float16)
    prompt = _ids(128, PROMPT)[None]
    settings = {
        "max_new_tokens": STEPS,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.inference_mode():
        plain = model.generate(prompt, **settings)
        run = SequenceRun(_loaded(model), PRESETS["none"])
        ours = model.generate(prompt, past_key_values=run.cache, **settings)
    assert ours.sequences.tolist() == plain.sequences.tolist()
    for a, b in zip(ours.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


# -- the real model -------------------------------------------------------------------

DEFAULT_GGUF = Path.home() / ".cache" / "minicache" / "models" / "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf() -> Path | None:
    path = Path(os.environ.get("MINICACHE_GEMMA3_GGUF") or DEFAULT_GGUF).expanduser()
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    path = gemma3_gguf()
    if path is None:
        pytest.skip(
            f"Gemma-3-270M GGUF not found (set MINICACHE_GEMMA3_GGUF or run "
            f"deploy/models/gemma3.sh to put it at {DEFAULT_GGUF})"
        )
    return load_model(str(path))


@pytest.mark.model
def test_gemma3_shape_kinds_and_rope(gemma) -> None:
    assert (gemma.num_layers, gemma.kv_heads, gemma.head_dim) == (18, 1, 256)
    # The GGUF carries no chat template: Gemma's turn format is set (needle prompts).
    assert gemma.tokenizer.chat_template == GEMMA3_CHAT_TEMPLATE
    # Sliding layers: eager attention (CPU SDPA is slow on a masked GQA decode step).
    assert gemma.model.config._attn_implementation == "eager"
    kinds = layer_kinds(gemma)
    assert [layer for layer, kind in enumerate(kinds) if kind == F] == [5, 11, 17]
    config = gemma.model.config
    assert config.sliding_window == 512
    dims = np.arange(0, 256, 2, dtype=np.float32) / 256
    for kind, table in zip(kinds, rope_tables(gemma), strict=True):
        theta = config.rope_parameters[kind]["rope_theta"]
        np.testing.assert_allclose(table.inv_freq, 1.0 / theta**dims, rtol=1e-6)
    assert {config.rope_parameters[kind]["rope_theta"] for kind in (S, F)} == {1e4, 1e6}


@pytest.mark.model
def test_gemma3_compressed_cache_matches_its_own_past_the_window(gemma) -> None:
    """A 600-token prompt (window 512) and 4 decode steps: the compressed cache with
    policy none against transformers' own cache, within fp16 storage."""
    from minicache_worker.texts import split_text

    prompt, steps = 600, 4
    ids = gemma.tokenizer(
        split_text("evaluation")[:6000], return_tensors="pt", add_special_tokens=False
    ).input_ids[0]
    model = gemma.model
    native = _log_probs(model, DynamicCache(config=model.config), ids, prompt, steps)
    run = SequenceRun(gemma, PRESETS["none"])
    ours = _log_probs(model, run.cache, ids, prompt, steps)
    difference = float((ours - native).abs().max())
    assert difference < 0.05
    assert torch.equal(ours.argmax(-1), native.argmax(-1))
    assert run.cache.layers[0].keys.shape[-2] == prompt + steps
    # Without the window the same prompt's logits past position 512 change a lot.
    window = model.config.sliding_window
    try:
        model.config.sliding_window = 100_000
        wrong = _log_probs(model, DynamicCache(), ids, prompt, steps)
    finally:
        model.config.sliding_window = window
    assert float((wrong[window:] - native[window:]).abs().max()) > 1.0


@pytest.mark.model
def test_gemma3_evaluation_runs_with_the_full_cache(gemma) -> None:
    settings = EvalSettings(
        context_tokens=520,
        continuation_tokens=16,
        needle_cases=1,
        needle_context_tokens=600,
        needle_answer_tokens=8,
        greedy_prompts=1,
        greedy_tokens=4,
    )
    row = Evaluator(gemma, settings).evaluate(PRESETS["none"])
    assert row["perplexity_increase"] == 0.0
    assert row["greedy_agreement"] == 1.0
    assert row["needle_accuracy"] == row["needle_accuracy_full"]
    assert row["compression_ratio"] == pytest.approx(1.0, abs=0.01)
