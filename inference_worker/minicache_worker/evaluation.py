"""What a compression policy costs in accuracy, measured on a real model in one run.

Every figure has its baseline from the same run: the full fp16 cache (policy `none`
through the same store and the same code path). Three measurements:

- perplexity of a continuation after a compressed prefix: the prefix is prefilled and
  stored (compressed), then the continuation is fed one token at a time, each token
  going through the decode-time path (merged, tested for retention, appended);
- needle retrieval: a passkey hidden at several depths of an essay haystack is stored
  compressed, then the question is prefilled against the restored history and the
  answer generated greedily; exact match: the answer's first number is the passkey;
- greedy agreement: the full cache generates greedily from several prompts; the
  compressed cache is fed the same tokens and we count how often its own greedy
  choice agrees (teacher-forced, so one early divergence does not hide the rest).

Texts are the evaluation split of the essays, disjoint from calibration.

Each requested policy is resolved against the model's shape first (`policy_for_model`):
`default` runs as the uncalibrated fallback on a model it was not calibrated for, and a
policy that does not fit is refused before anything runs. A row names both the policy
requested (`policy`) and the one that ran (`resolved_policy`, whose settings are in
`policy_config`); `evaluate_each` turns a refused or failing policy into an error row
(`{"model", "policy", "error"}`) and goes on with the next.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from minicache_client.policy import PRESETS, CompressionPolicy, policy_for_model
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_worker.compressed_cache import STORE_DTYPE, CompressedCache
from minicache_worker.models import LoadedModel
from minicache_worker.texts import needle_cases, split_text

log = logging.getLogger(__name__)

Item = TypeVar("Item")
# A progress bar over one phase: (items, phase description, item count, unit) -> the
# same items. The command line draws bars (tqdm); library callers get none by default.
PhaseBar = Callable[[Iterable[Item], str, int, str], Iterable[Item]]


def no_bar(items: Iterable[Item], phase: str, total: int, unit: str) -> Iterable[Item]:
    return items


def first_number(answer: str) -> str | None:
    """The first run of digits in a generated answer: the exact-match candidate."""
    found = re.search(r"\d+", answer)
    return found.group() if found else None


def flag_field(default: Any, help_text: str) -> Any:
    """A settings field with the help text of its command-line flag (cli._add_settings)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class EvalSettings:
    context_tokens: int = flag_field(
        1024, "tokens of the compressed prefix that the perplexity continuation follows"
    )
    continuation_tokens: int = flag_field(
        512, "continuation tokens scored for perplexity, fed one at a time through the decode path"
    )
    needle_cases: int = flag_field(
        12, "passkey-retrieval cases, at 10, 50 and 90 percent depth in turn; 0 skips them"
    )
    needle_context_tokens: int = flag_field(
        2048, "approximate haystack length of each passkey case, in tokens"
    )
    needle_answer_tokens: int = flag_field(24, "tokens generated greedily for each passkey answer")
    greedy_prompts: int = flag_field(
        4, "prompts of --context-tokens tokens for greedy agreement; 0 skips it"
    )
    greedy_tokens: int = flag_field(
        32, "tokens per prompt whose greedy choice is compared with the full cache's"
    )

    def __post_init__(self) -> None:
        for name in ("context_tokens", "continuation_tokens", "needle_context_tokens"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be at least 16, got {getattr(self, name)}")
        for name in ("needle_cases", "greedy_prompts", "greedy_tokens", "needle_answer_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class SequenceRun:
    """One sequence through a policy's store and a compressed cache."""

    def __init__(self, lm: LoadedModel, policy: CompressionPolicy) -> None:
        self.lm = lm
        self.store = SequenceEncoder(
            policy,
            num_layers=lm.num_layers,
            kv_heads=lm.kv_heads,
            head_dim=lm.head_dim,
            dtype=STORE_DTYPE,
        )
        self.cache = CompressedCache(self.store, lm.num_layers)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[tokens, vocab]` for 1-D `token_ids` appended to the sequence."""
        output = self.lm.model(token_ids[None], past_key_values=self.cache, use_cache=True)
        return output.logits[0]


class Evaluator:
    def __init__(
        self, lm: LoadedModel, settings: EvalSettings | None = None, bar: PhaseBar = no_bar
    ) -> None:
        self.lm = lm
        self.settings = settings or EvalSettings()
        self.bar = bar
        s = self.settings
        tokenizer = lm.tokenizer
        text = split_text("evaluation")
        self.tokens = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        window = s.context_tokens + s.continuation_tokens
        needed = window + s.greedy_prompts * s.context_tokens
        if self.tokens.numel() < needed:
            raise ValueError(
                f"the evaluation text has {self.tokens.numel()} tokens, {needed} needed"
            )
        self.prefix = self.tokens[: s.context_tokens]
        self.continuation = self.tokens[s.context_tokens : window]
        self.greedy_prompt_ids = [
            self.tokens[window + i * s.context_tokens : window + (i + 1) * s.context_tokens]
            for i in range(s.greedy_prompts)
        ]
        self.needles = self._needle_prompts()
        self._full: dict[str, Any] | None = None

    # -- prompts ----------------------------------------------------------------------

    def _needle_prompts(self) -> list[tuple[str, torch.Tensor, int]]:
        """(passkey, prompt ids, split) per case; the context part [:split] is stored
        first, the question part [split:] is prefilled against it."""
        s = self.settings
        tokenizer = self.lm.tokenizer
        chars_per_token = len(split_text("evaluation")) / self.tokens.numel()
        cases = needle_cases(s.needle_cases, int(s.needle_context_tokens * chars_per_token))
        prompts = []
        for case in cases:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{case.context}\n\n{case.question}"}],
                add_generation_prompt=True,
                tokenize=False,
            )
            context_text = text[: text.rindex(case.question)]
            full = tokenizer(text, add_special_tokens=False).input_ids
            context = tokenizer(context_text, add_special_tokens=False).input_ids
            split = next(
                (i for i, (a, b) in enumerate(zip(full, context, strict=False)) if a != b),
                min(len(full), len(context)),
            )
            prompts.append((case.passkey, torch.tensor(full), split))
        return prompts

    # -- measurements -----------------------------------------------------------------

    @torch.inference_mode()
    def perplexity(self, policy: CompressionPolicy, label: str = "") -> dict[str, Any]:
        run = SequenceRun(self.lm, policy)
        logits = run.forward(self.prefix)[-1]
        ratio_after_prefix = run.store.compression_ratio()
        stored_after_prefix = run.store.stored_bytes()
        total = 0.0
        targets = self.continuation
        steps = targets.numel()
        phase = f"{label or policy.name}: perplexity"
        for position in self.bar(range(steps), phase, steps, "token"):
            total += float(
                torch.nn.functional.cross_entropy(logits[None], targets[position : position + 1])
            )
            if position + 1 < targets.numel():
                logits = run.forward(targets[position : position + 1])[-1]
        return {
            "perplexity": math.exp(total / targets.numel()),
            "compression_ratio": ratio_after_prefix,
            "stored_bytes": stored_after_prefix,
            "fp16_bytes": run.store.fp16_bytes()
            * self.prefix.numel()
            // run.store.entries[0].tokens,
            "compression_ratio_final": run.store.compression_ratio(),
        }

    def _greedy(
        self, run: SequenceRun, first_logits: torch.Tensor, steps: int, forced: list[int] | None
    ) -> list[int]:
        """Greedy choices for `steps` tokens; feeds `forced` tokens instead when given."""
        chosen: list[int] = []
        logits = first_logits
        eos = self.lm.tokenizer.eos_token_id
        for step in range(steps):
            token = int(logits.argmax())
            chosen.append(token)
            fed = forced[step] if forced is not None else token
            if step + 1 == steps or (forced is None and token == eos):
                break
            logits = run.forward(torch.tensor([fed]))[-1]
        return chosen

    @torch.inference_mode()
    def needle(self, policy: CompressionPolicy, label: str = "") -> dict[str, Any]:
        correct = 0
        answers = []
        phase = f"{label or policy.name}: needles"
        for passkey, ids, split in self.bar(self.needles, phase, len(self.needles), "case"):
            run = SequenceRun(self.lm, policy)
            run.forward(ids[:split])
            logits = run.forward(ids[split:])[-1]
            tokens = self._greedy(run, logits, self.settings.needle_answer_tokens, None)
            answer = self.lm.tokenizer.decode(tokens, skip_special_tokens=True)
            correct += first_number(answer) == passkey
            answers.append(answer.strip())
        return {
            "needle_accuracy": correct / max(1, len(self.needles)),
            "needle_answers": answers,
            "needle_context_tokens": [int(ids.numel()) for _, ids, _ in self.needles],
        }

    @torch.inference_mode()
    def greedy_tokens(
        self, policy: CompressionPolicy, forced: list[list[int]] | None, label: str = ""
    ) -> list[list[int]]:
        outputs = []
        prompts = self.greedy_prompt_ids
        phase = f"{label or policy.name}: greedy"
        for index, prompt in enumerate(self.bar(prompts, phase, len(prompts), "prompt")):
            run = SequenceRun(self.lm, policy)
            logits = run.forward(prompt)[-1]
            reference = forced[index] if forced is not None else None
            outputs.append(self._greedy(run, logits, self.settings.greedy_tokens, reference))
        return outputs

    # -- one policy, with its baseline ------------------------------------------------

    def full_cache(self) -> dict[str, Any]:
        """Baseline figures of the full fp16 cache, computed once per evaluator."""
        if self._full is None:
            none, label = PRESETS["none"], "full cache"
            self._full = {
                **self.perplexity(none, label),
                **self.needle(none, label),
                "greedy": self.greedy_tokens(none, None, label),
            }
        return self._full

    def resolve(self, policy: CompressionPolicy) -> CompressionPolicy:
        """The policy that runs for `policy` on this model; ValueError when it does not
        fit. The fallback for `default` is logged with the reason."""
        ran = policy_for_model(policy, self.lm.shape)
        if ran is not policy:
            log.info(
                "policy %r does not fit %s (%s); running %r instead",
                policy.name,
                self.lm.name,
                policy.unfit_reason(self.lm.shape),
                ran.name,
            )
        return ran

    def evaluate(self, policy: CompressionPolicy) -> dict[str, Any]:
        """One row of figures for `policy` (resolved for this model first), against the
        full cache's. Raises ValueError when the policy does not fit the model."""
        started = time.perf_counter()
        requested, policy = policy, self.resolve(policy)
        full = self.full_cache()
        label = shown_name(requested.name, policy.name)
        measured = {**self.perplexity(policy, label), **self.needle(policy, label)}
        predictions = self.greedy_tokens(policy, full["greedy"], label)
        pairs = [
            (mine, theirs)
            for mine_run, their_run in zip(predictions, full["greedy"], strict=True)
            for mine, theirs in zip(mine_run, their_run, strict=False)
        ]
        agreement = sum(a == b for a, b in pairs) / max(1, len(pairs))
        return {
            "model": self.lm.name,
            "policy": requested.name,
            "resolved_policy": policy.name,
            "policy_config": policy.to_dict(),
            "context_tokens": int(self.prefix.numel()),
            "continuation_tokens": int(self.continuation.numel()),
            "compression_ratio": measured["compression_ratio"],
            "compression_ratio_final": measured["compression_ratio_final"],
            "stored_bytes": measured["stored_bytes"],
            "fp16_bytes": measured["fp16_bytes"],
            "perplexity": measured["perplexity"],
            "perplexity_full": full["perplexity"],
            "perplexity_increase": measured["perplexity"] / full["perplexity"] - 1,
            "needle_accuracy": measured["needle_accuracy"],
            "needle_accuracy_full": full["needle_accuracy"],
            "needle_cases": len(self.needles),
            "needle_context_tokens": measured["needle_context_tokens"],
            "needle_answers": measured["needle_answers"],
            "greedy_agreement": agreement,
            "greedy_tokens": len(pairs),
            "seconds": time.perf_counter() - started,
        }


def shown_name(requested: str, ran: str) -> str:
    """A policy as shown to people: 'default (as kivi4_sink)' where it fell back."""
    return requested if ran == requested else f"{requested} (as {ran})"


def policy_label(row: dict[str, Any]) -> str:
    """A row's policy as shown to people (error rows name only what was requested)."""
    return shown_name(row["policy"], row.get("resolved_policy", row["policy"]))


def evaluate_each(
    evaluator: Evaluator, policies: Sequence[CompressionPolicy]
) -> list[dict[str, Any]]:
    """A row per policy, in order. A policy that does not fit the model, or fails with
    ValueError while it runs, becomes an error row `{"model", "policy", "error"}` and
    the next policy still runs."""
    rows = []
    for policy in evaluator.bar(policies, "policies", len(policies), "policy"):
        try:
            row = evaluator.evaluate(policy)
        except ValueError as exc:
            log.error("policy %r failed: %s", policy.name, exc)
            row = {"model": evaluator.lm.name, "policy": policy.name, "error": str(exc)}
        else:
            log.info(
                "%s: ratio %.2f, perplexity %+.2f%%, needles %.0f%%, greedy agreement %.1f%%",
                policy_label(row),
                row["compression_ratio"],
                100 * row["perplexity_increase"],
                100 * row["needle_accuracy"],
                100 * row["greedy_agreement"],
            )
        rows.append(row)
    return rows
