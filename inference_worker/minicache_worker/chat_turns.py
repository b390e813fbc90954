"""A user message as the tokens of a new user turn of a chat, after a session's history.

The first turn is the chat template's rendering of the message alone, generation prompt
included. A later turn continues a history that ends inside an assistant reply, so its
tokens are the text that closes that reply and opens a user turn, the message, and the
generation prompt. That text is found generically: render a conversation with
placeholder turns (user "A", assistant `PLACEHOLDER_REPLY`, then the message) and keep
what follows the placeholder reply. When the history already ends with an end-of-turn
token (the model stopped on it), that token's text is dropped from the front so the
turn is not closed twice.

A tokenizer without a chat template gets the message's raw text.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

PLACEHOLDER_REPLY = "<placeholder>"
_PLACEHOLDER_USER = "A"


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template's text carries its own special tokens: add no BOS/EOS of our own.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(text, Mapping):  # some versions wrap even untokenized output
        text = text["input_ids"]
    return str(text)


def end_of_turn_ids(tokenizer: Any, extra: Collection[int] = ()) -> set[int]:
    """The tokenizer's end-of-sequence token and `extra` (the model's stop tokens)."""
    ids = {int(token) for token in extra}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def user_turn_tokens(
    tokenizer: Any,
    history_tokens: Sequence[int],
    message: str,
    *,
    stop_tokens: Collection[int] = (),
) -> list[int]:
    """The tokens of `message` as a new user turn after `history_tokens`, ending with
    the generation prompt (the model answers next).

    `stop_tokens`: the model's end-of-turn ids (generation_config.eos_token_id) besides
    the tokenizer's eos token. A continuation is tokenized on its own: with tokenizers
    whose pieces depend on the text before them (a leading-space marker), its first
    token can differ from the whole conversation's tokenization; chat templates that
    open each turn with a special token, as most do, are unaffected.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return _encode(tokenizer, message)
    user = {"role": "user", "content": message}
    if not history_tokens:
        return _encode(tokenizer, _render(tokenizer, [user]))
    rendered = _render(
        tokenizer,
        [
            {"role": "user", "content": _PLACEHOLDER_USER},
            {"role": "assistant", "content": PLACEHOLDER_REPLY},
            user,
        ],
    )
    _, found, continuation = rendered.rpartition(PLACEHOLDER_REPLY)
    if not found:
        # A template that drops or rewrites assistant turns: open the user turn as a
        # first turn would, without closing the reply.
        return _encode(tokenizer, _render(tokenizer, [user]))
    last = int(history_tokens[-1])
    if last in end_of_turn_ids(tokenizer, stop_tokens):
        closing = tokenizer.decode([last], skip_special_tokens=False)
        if closing and continuation.startswith(closing):
            continuation = continuation[len(closing) :]
    return _encode(tokenizer, continuation)
