"""Generation with the KV cache in a real cache server (gRPC on loopback), checked
against plain local generation with transformers' DynamicCache, on the real model."""

from __future__ import annotations

import pytest
import torch
from service_fixtures import ServerThread, settings_for
from transformers.cache_utils import DynamicCache

from minicache_client import CacheClient, ClientConfig
from minicache_worker.generation import (
    RecomputeReason,
    Residency,
    TurnGenerator,
    TurnRequest,
    TurnSummary,
)
from minicache_worker.service_cache import SequenceWriter, token_digest

pytestmark = pytest.mark.model

MAX_NEW = 10
RESIDENCIES = [Residency.LOCAL, Residency.REMOTE]


@pytest.fixture(scope="module")
def turn_inputs(lm) -> list[list[int]]:
    """A first user turn (chat template) and a second one (raw continuation tokens)."""
    first = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the history of Paris in a few sentences."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    first = list(first["input_ids"] if hasattr(first, "keys") else first)
    second = lm.tokenizer(
        "<|im_end|>\n<|im_start|>user\nAnd what about London?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    return [first, list(second)]


def reference_turns(lm, turn_inputs: list[list[int]], max_new: int) -> list[list[int]]:
    """Plain local greedy generation over turns, one DynamicCache for the conversation,
    with the same chunks the worker runs: each turn prefills the previous turn's last
    token (never fed) and its new tokens, then decodes one token at a time."""
    stop = lm.model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    cache = DynamicCache()
    turns: list[list[int]] = []
    pending: list[int] = []
    for new in turn_inputs:
        feed = pending + list(new)
        generated: list[int] = []
        for _ in range(max_new):
            with torch.inference_mode():
                logits = lm.model(
                    input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True
                ).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if token in stop:
                break
            feed = [token]
        pending = [generated[-1]]
        turns.append(generated)
    return turns


def run_turn(
    generator: TurnGenerator, request: TurnRequest, stop_after: int | None = None, action=None
) -> tuple[list[int], TurnSummary]:
    tokens: list[int] = []
    summary = None
    for event in generator.generate(request):
        if isinstance(event, TurnSummary):
            summary = event
            continue
        tokens.append(event)
        if stop_after is not None and len(tokens) == stop_after:
            action()
    assert summary is not None and summary.turn_tokens[-len(tokens) :] == tokens
    return tokens, summary


def conversation(
    generator: TurnGenerator,
    session: str,
    turn_inputs: list[list[int]],
    *,
    policy: str,
    residency: Residency,
) -> tuple[list[list[int]], list[TurnSummary]]:
    history: list[int] = []
    outputs, summaries = [], []
    for new in turn_inputs:
        request = TurnRequest(session, history, new, MAX_NEW, policy, residency)
        tokens, summary = run_turn(generator, request)
        history = history + summary.turn_tokens
        outputs.append(tokens)
        summaries.append(summary)
    return outputs, summaries


@pytest.fixture(scope="module")
def reference(lm, turn_inputs) -> list[list[int]]:
    return reference_turns(lm, turn_inputs, MAX_NEW)


@pytest.fixture(scope="module")
def cache_server():
    running = ServerThread(settings_for())
    try:
        yield running
    finally:
        running.stop()


def client_of(server: ServerThread, timeout_s: float = 10.0) -> CacheClient:
    return CacheClient(ClientConfig(server.address, insecure=True, timeout_s=timeout_s))


@pytest.mark.parametrize("residency", RESIDENCIES, ids=lambda r: r.value)
def test_policy_none_is_token_identical_to_local_generation(
    lm, cache_server, turn_inputs, reference, residency
) -> None:
    with client_of(cache_server) as client:
        generator = TurnGenerator(lm, client)
        outputs, summaries = conversation(
            generator, f"none-{residency.value}", turn_inputs, policy="none", residency=residency
        )
        assert outputs == reference
        first, second = summaries
        assert first.recompute_reason is RecomputeReason.NONE and first.cached_tokens == 0
        # The second turn restored the whole first turn from the service.
        assert second.cached_tokens == len(turn_inputs[0]) + len(reference[0]) - 1
        assert second.prefilled_tokens == 1 + len(turn_inputs[1])
        assert second.recompute_reason is RecomputeReason.NONE
        assert first.stored and second.stored
        held = client.lookup(lm.name, f"none-{residency.value}").tokens
        assert held == sum(map(len, turn_inputs)) + sum(map(len, reference)) - 1
        assert generator.metrics.resumed_turns.value() == 1


def test_plain_local_generator_matches_reference(lm, turn_inputs, reference) -> None:
    outputs, summaries = conversation(
        TurnGenerator(lm, None), "local", turn_inputs[:1], policy="", residency=Residency.LOCAL
    )
    assert outputs == reference[:1] and not summaries[0].stored


@pytest.mark.parametrize("residency", RESIDENCIES, ids=lambda r: r.value)
def test_default_policy_resumes_identically_on_a_second_worker(
    lm, cache_server, turn_inputs, reference, residency, record_property
) -> None:
    """Two sessions get the same first turn; the second turn of one runs on the first
    worker, of the other on a second worker (its own client and generator)."""
    with client_of(cache_server) as first_client, client_of(cache_server) as second_client:
        first_worker = TurnGenerator(lm, first_client)
        second_worker = TurnGenerator(lm, second_client)
        results = {}
        for session, worker in (("a", first_worker), ("b", second_worker)):
            session = f"default-{residency.value}-{session}"
            first_tokens, first = run_turn(
                first_worker,
                TurnRequest(session, [], turn_inputs[0], MAX_NEW, "default", residency),
            )
            second_tokens, second = run_turn(
                worker,
                TurnRequest(
                    session, first.turn_tokens, turn_inputs[1], MAX_NEW, "default", residency
                ),
            )
            assert second.cached_tokens == len(first.turn_tokens) - 1
            results[session[-1]] = (first_tokens, second_tokens)
        assert results["a"] == results["b"]
        lookup = first_client.lookup(lm.name, f"default-{residency.value}-a")
        # Short: most tokens still wait for a full quantization group in 16 bits.
        assert lookup.compression_ratio > 1
    # Agreement with the full cache, measured (it is not expected to be 1).
    pairs = list(zip(results["a"][1], reference[1], strict=False))
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    record_property("default_agreement_second_turn", agreement)
    assert 0 <= agreement <= 1


def test_dead_cache_server_between_turns_recomputes(lm, turn_inputs) -> None:
    server = ServerThread(settings_for())
    with client_of(server, timeout_s=3.0) as client:
        generator = TurnGenerator(lm, client)
        _, first = run_turn(generator, TurnRequest("dies", [], turn_inputs[0], MAX_NEW, "none"))
        server.stop()
        request = TurnRequest("dies", first.turn_tokens, turn_inputs[1], MAX_NEW, "none")
        tokens, summary = run_turn(generator, request)
    expected, _ = run_turn(TurnGenerator(lm, None), request)
    assert tokens == expected
    assert summary.recompute_reason is RecomputeReason.UNAVAILABLE
    assert summary.cached_tokens == 0 and not summary.stored
    assert generator.metrics.recomputes.value(reason="unavailable") == 1
    assert generator.metrics.store_failures.value() == 1


@pytest.mark.parametrize("residency", RESIDENCIES, ids=lambda r: r.value)
def test_cache_server_killed_mid_turn(lm, turn_inputs, reference, residency) -> None:
    """The server dies after the third token of the second turn: the turn finishes
    (remote residency recomputes its history locally), with the reference's tokens."""
    server = ServerThread(settings_for())
    with client_of(server, timeout_s=3.0) as client:
        generator = TurnGenerator(lm, client)
        first_tokens, first = run_turn(
            generator,
            TurnRequest("killed", [], turn_inputs[0], MAX_NEW, "none", residency),
        )
        request = TurnRequest(
            "killed", first.turn_tokens, turn_inputs[1], MAX_NEW, "none", residency
        )
        tokens, summary = run_turn(generator, request, stop_after=3, action=server.stop)
    assert [first_tokens, tokens] == reference
    assert summary.cached_tokens > 0 and not summary.stored
    assert generator.metrics.store_failures.value() == 1
    if residency is Residency.REMOTE:
        assert summary.recompute_reason is RecomputeReason.UNAVAILABLE


def test_corrupt_overflowed_entry_is_recomputed(lm, turn_inputs, redis_process) -> None:
    """A session overflowed to Redis has one bit flipped there: the server finds it out
    by checksum and answers a miss, and the resumed turn recomputes with the tokens of a
    fresh start."""
    # Room for one session's KV (about 1.8 MB in fp32), not two.
    server = ServerThread(settings_for(device_budget_bytes=3 << 20, redis_url=redis_process.url))
    try:
        with client_of(server) as client:
            generator = TurnGenerator(lm, client)
            _, first = run_turn(generator, TurnRequest("flip", [], turn_inputs[0], 4, "none"))
            run_turn(generator, TurnRequest("newer", [], turn_inputs[0], 4, "none"))
            assert client.lookup(lm.name, "flip").overflow_bytes > 0
            redis = redis_process.client()
            # An entry of the session, not its manifest (which sits beside its entries).
            key = next(
                key
                for key in redis.keys("*")
                if b":flip:" in key and not key.endswith(b":manifest")
            )
            value = bytearray(redis.get(key))
            value[len(value) // 2] ^= 0x10
            redis.set(key, bytes(value))
            request = TurnRequest("flip", first.turn_tokens, turn_inputs[1], MAX_NEW, "none")
            tokens, summary = run_turn(generator, request)
            assert server.store.metrics.corrupt_entries.value() == 1
    finally:
        server.stop()
    expected, _ = run_turn(TurnGenerator(lm, None), request)
    assert tokens == expected
    assert summary.recompute_reason is RecomputeReason.MISS
    assert summary.cached_tokens == 0 and summary.stored  # rewritten from token 0


@pytest.mark.parametrize("change", ["shortened", "edited"])
def test_history_that_is_not_the_cached_ones_is_recomputed(
    lm, cache_server, turn_inputs, change
) -> None:
    """The cached KV is used only for the history it was computed from (its content
    tag): a history that lost tokens, or has one token changed, is recomputed."""
    session = f"changed-{change}"
    with client_of(cache_server) as client:
        generator = TurnGenerator(lm, client)
        _, first = run_turn(generator, TurnRequest(session, [], turn_inputs[0], 4, "none"))
        history = list(first.turn_tokens)
        if change == "shortened":
            history = history[:5]
        else:
            history[len(history) // 2] = lm.tokenizer.convert_tokens_to_ids("Paris")
            assert history != list(first.turn_tokens)
        request = TurnRequest(session, history, turn_inputs[1], 4, "none")
        tokens, summary = run_turn(generator, request)
    expected, _ = run_turn(TurnGenerator(lm, None), request)
    assert tokens == expected
    assert summary.recompute_reason is RecomputeReason.MISMATCH and summary.stored


def test_kv_in_float16_from_a_float32_model(lm, cache_server, turn_inputs) -> None:
    """KV stored narrower than the model computes it: converted on the way out and
    widened on the way back; the second turn resumes."""
    with client_of(cache_server) as client:
        generator = TurnGenerator(lm, client, kv_dtype="float16")
        _, first = run_turn(generator, TurnRequest("fp16", [], turn_inputs[0], 4, "none"))
        request = TurnRequest("fp16", first.turn_tokens, turn_inputs[1], 4, "none")
        _, second = run_turn(generator, request)
        assert first.stored and second.stored
        assert second.cached_tokens == len(first.turn_tokens) - 1
        assert client.lookup(lm.name, "fp16").dtype == "float16"
    with pytest.raises(ValueError, match="kv_dtype"):
        TurnGenerator(lm, None, kv_dtype="int8")


def test_a_failed_extension_aborted_for_a_recompute_does_not_stop_the_rewrite(
    cache_server,
) -> None:
    """The extension of a history fails (the service no longer holds the sequence, as
    after finding an entry corrupt); the turn aborts it and writes the sequence again from
    token 0, which the writer sends instead of dropping it with the failed put's error."""
    layers, kv_heads, head_dim = 2, 1, 4
    with client_of(cache_server) as client:
        writer = SequenceWriter(
            client,
            "m",
            "rewritten",
            num_layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype="float16",
            policy="none",
        )
        try:
            kv = torch.randn(kv_heads, 6, head_dim)
            writer.start_put(3, 3, b"extension")  # nothing is held: refused
            for layer in range(layers):
                writer.layer(layer, kv[:, 3:], kv[:, 3:])
            writer.end_put()
            assert writer.flush() is not None
            writer.abort_put()
            writer.start_put(0, 6, b"rewrite")
            for layer in range(layers):
                writer.layer(layer, kv, kv)
            writer.end_put()
            assert writer.flush() is None
            assert writer.held_tokens == 6
        finally:
            writer.close()
        assert client.lookup("m", "rewritten").tokens == 6


def test_a_turn_retried_after_its_worker_went_away_resumes_from_its_stored_input(
    lm, cache_server, turn_inputs
) -> None:
    """A worker keeps a turn's decode steps until the turn ends: one that goes away in
    the middle of its decode leaves the service holding the turn's input, which a retry
    of the turn on another worker restores (all but the last token, which runs again
    for its logits and is not written twice)."""
    session = "retried"
    with client_of(cache_server) as client:
        first_worker = TurnGenerator(lm, client)
        _, first = run_turn(first_worker, TurnRequest(session, [], turn_inputs[0], 4, "none"))
        request = TurnRequest(session, first.turn_tokens, turn_inputs[1], MAX_NEW, "none")
        total = len(request.input_tokens)
        going_away = first_worker.generate(request)
        assert isinstance(next(going_away), int)  # prefilled (and stored), decoding
        going_away.close()  # as when the caller or the worker goes away mid-turn
        held = client.lookup(lm.name, session)
        assert held.tokens == total and held.tag == token_digest(request.input_tokens)
        second_worker = TurnGenerator(lm, client)
        tokens, retry = run_turn(second_worker, request)
        assert retry.recompute_reason is RecomputeReason.NONE
        assert (retry.cached_tokens, retry.prefilled_tokens) == (total - 1, 1)
        assert retry.stored and client.lookup(lm.name, session).tokens == total + len(tokens) - 1
    expected, _ = run_turn(TurnGenerator(lm, None), request)
    assert tokens == expected
