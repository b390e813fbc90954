"""Calibration: measure what each candidate merge and quantization costs on one model,
and build the policy with the highest compression ratio inside an accuracy budget.

Why: on small models adjacent layers' KV are not similar, so the paper's fixed rule
("merge every pair from L/2") costs a lot; which pairs, K or V, which t, and which
quantization a model tolerates is an empirical question, answered here on the
calibration split of the essays (disjoint from the evaluation split).

Cost of a candidate = relative perplexity increase of `scored_tokens` continuation
tokens after a compressed prefix of `context_tokens`, averaged over several windows of
calibration text. The continuation goes through the decode-time path as evaluation
and serving do, but `decode_chunk_tokens` tokens per forward pass instead of one: each
chunk is stored unsealed, exactly as that many decode steps would store it, so later
tokens attend to its compressed form; only inside a chunk do tokens see each other as
computed. The continuation must be compressed too: scoring it against a compressed
prefix alone misses most of the damage, since most attention goes to recent tokens
(a value merge of one pair costs +0.4% that way on SmolLM2, +10% through decode).
The prefix KV is computed once per window with the model's own cache (compression
never changes the prefill itself: prefix tokens attend to each other as computed).

Search, greedy and measured at every step:
1. every quantization candidate; keep those within the budget;
2. on each of the best few, every single change: one merge (pair, K or V, t), or one
   layer's keys or values one bit width lower; rank them by perplexity cost per
   stored byte saved;
3. apply changes in that order, re-measuring the combined policy each time, keeping a
   change only while the combined cost stays within the budget.
The policy with the highest measured ratio wins. `quantization_only` stops after 1.
The written policy carries the model's shape (`calibrated_for`), so that it is applied
to that model only (`policy_for_model`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import DynamicCache

from minicache_client.policy import (
    PRESETS,
    QUANT_BITS,
    CompressionPolicy,
    LayerBits,
    MergePlan,
    ModelShape,
    PairMerge,
    Quantization,
)
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_worker.compressed_cache import STORE_DTYPE, CompressedCache
from minicache_worker.evaluation import PhaseBar, flag_field, no_bar
from minicache_worker.models import LoadedModel
from minicache_worker.texts import split_text

log = logging.getLogger(__name__)

# Quantization candidates, from gentle to aggressive. Keys per channel in groups of
# `key_group_size` tokens, values per token in groups of `value_group_size` channels;
# the first tokens ("attention sinks") carry outliers that wreck a group's min/max
# range, so most candidates keep a few of them in 16-bit.
# (A first, wider sweep on SmolLM2 found every 2-bit-keys-everywhere setting above +14%,
# and groups of 128 tokens for keys better than smaller ones once sinks are kept.)
QUANTIZATION_CANDIDATES: tuple[Quantization, ...] = (
    Quantization(4, 4, 32, 32),
    Quantization(4, 3, 64, 32, sink_tokens=4),
    Quantization(4, 3, 128, 64, sink_tokens=16),
    Quantization(3, 3, 128, 64, sink_tokens=16),
    Quantization(4, 2, 128, 64, sink_tokens=16),
    Quantization(3, 2, 128, 32, sink_tokens=16),
    Quantization(3, 2, 128, 64, sink_tokens=4),
    Quantization(3, 2, 128, 64, sink_tokens=32),
    Quantization(2, 2, 128, 64, sink_tokens=16),
)
MERGE_T_VALUES: tuple[float, ...] = (0.6,)
MERGE_KINDS = ("keys", "values")


@dataclass(frozen=True)
class CalibrationSettings:
    budget: float = flag_field(
        0.015,
        "allowed relative perplexity increase on calibration text, a fraction: 0.015 is +1.5%",
    )
    context_tokens: int = flag_field(1024, "tokens of each window's compressed prefix")
    scored_tokens: int = flag_field(256, "continuation tokens scored in each window")
    decode_chunk_tokens: int = flag_field(
        16,
        "continuation tokens per forward pass while scoring; each chunk is stored "
        "compressed before the next, as decoding would; 1 is token by token, the slowest",
    )
    windows: int = flag_field(6, "windows of calibration text every candidate is scored on")
    quantization_finalists: int = 1
    t_values: tuple[float, ...] = MERGE_T_VALUES
    merge_first_layers: tuple[int, ...] | None = None  # candidate pairs; None: every pair
    merge_kinds: tuple[str, ...] = MERGE_KINDS  # which sides candidate merges merge
    # At least decode_chunk_tokens, so that the chunked scoring sees what token-by-token
    # decoding sees.
    merge_window: int = flag_field(
        32, "recent tokens a candidate merge keeps unmerged; at least --decode-chunk-tokens"
    )
    # Stop after step 1: the best quantization candidate within the budget (minutes,
    # where the full search takes about an hour on two CPU cores).
    quantization_only: bool = False
    quantization_candidates: tuple[Quantization, ...] = QUANTIZATION_CANDIDATES

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"budget must be in (0, 1), got {self.budget}")
        if self.context_tokens < 16 or self.scored_tokens < 2:
            raise ValueError("context_tokens must be >= 16 and scored_tokens >= 2")
        if self.windows < 1 or self.quantization_finalists < 1 or self.decode_chunk_tokens < 1:
            raise ValueError("windows, quantization_finalists and decode_chunk_tokens must be >= 1")
        if self.merge_window < self.decode_chunk_tokens:
            raise ValueError(
                f"merge_window ({self.merge_window}) must be at least decode_chunk_tokens "
                f"({self.decode_chunk_tokens}): a chunk sees its own tokens unmerged"
            )
        if not self.merge_kinds or any(kind not in MERGE_KINDS for kind in self.merge_kinds):
            raise ValueError(f"merge_kinds must be among {MERGE_KINDS}, got {self.merge_kinds}")
        if not self.t_values or any(not 0.0 <= t <= 1.0 for t in self.t_values):
            raise ValueError(f"t_values must be non-empty, each in [0, 1], got {self.t_values}")


@dataclass(frozen=True)
class Measurement:
    label: str
    policy: CompressionPolicy
    perplexity: float
    cost: float  # perplexity / baseline perplexity - 1
    compression_ratio: float
    stored_bytes: int
    # Mean KL divergence (nats per token) of the next-token distributions from the full
    # cache's: steadier than perplexity between close settings (docs/design.md).
    kl: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "policy": self.policy.to_dict(),
            "perplexity": self.perplexity,
            "cost": self.cost,
            "kl": self.kl,
            "compression_ratio": self.compression_ratio,
            "stored_bytes": self.stored_bytes,
        }


@dataclass
class CalibrationWindow:
    """One piece of calibration text: its prefix KV (computed once) and scored tokens."""

    prefix_kv: list[tuple[Any, Any]]  # per layer: keys, values as fp16 [kv_heads, T, d]
    continuation: torch.Tensor  # 1-D token ids; the first is predicted by the prefix


class CalibrationScorer:
    """Perplexity, and KL divergence from the full cache, of calibration continuations
    after a compressed prefix. `split`: the essays the windows come from."""

    def __init__(
        self,
        lm: LoadedModel,
        settings: CalibrationSettings,
        bar: PhaseBar = no_bar,
        split: str = "calibration",
    ) -> None:
        self.lm = lm
        self.settings = settings
        tokens = lm.tokenizer(
            split_text(split), return_tensors="pt", add_special_tokens=False
        ).input_ids[0]
        span = settings.context_tokens + settings.scored_tokens
        if tokens.numel() < span * settings.windows:
            raise ValueError(
                f"the calibration text has {tokens.numel()} tokens; {settings.windows} "
                f"windows of {span} need {span * settings.windows}"
            )
        stride = tokens.numel() // settings.windows
        starts = [i * stride for i in range(settings.windows)]
        self.windows = [
            self._window(tokens[start : start + span])
            for start in bar(starts, "prefix KV of calibration windows", len(starts), "window")
        ]
        # The full cache's next-token log-probabilities, per window (float16).
        self.reference: list[torch.Tensor] = []
        self.baseline = self._perplexity(PRESETS["none"])[0]

    @torch.inference_mode()
    def _window(self, ids: torch.Tensor) -> CalibrationWindow:
        context = self.settings.context_tokens
        cache = DynamicCache()
        self.lm.model(ids[None, :context], past_key_values=cache, use_cache=True)
        prefix_kv = [
            (
                layer.keys[0].to(torch.float16).numpy(),
                layer.values[0].to(torch.float16).numpy(),
            )
            for layer in cache.layers
        ]
        return CalibrationWindow(prefix_kv, ids[context:])

    def stored_prefix(
        self, policy: CompressionPolicy, window: CalibrationWindow
    ) -> SequenceEncoder:
        """The window's prefix KV stored (sealed) under `policy`."""
        store = SequenceEncoder(
            policy,
            num_layers=self.lm.num_layers,
            kv_heads=self.lm.kv_heads,
            head_dim=self.lm.head_dim,
            dtype=STORE_DTYPE,
        )
        for layer, (keys, values) in enumerate(window.prefix_kv):
            store.put_layer(layer, keys, values, seal=True)
        return store

    @torch.inference_mode()
    def _perplexity(self, policy: CompressionPolicy) -> tuple[float, float, int, float]:
        """(perplexity, compression ratio, stored bytes, mean KL from the full cache)
        over all windows. The first call (the full cache) records the reference."""
        nll, count, stored, fp16, kl = 0.0, 0, 0, 0, 0.0
        recording = not self.reference
        for index, window in enumerate(self.windows):
            store = self.stored_prefix(policy, window)
            stored += store.stored_bytes()
            fp16 += store.fp16_bytes()
            cache = CompressedCache(store, self.lm.num_layers, seal_chunks=False)
            ids = window.continuation
            step = self.settings.decode_chunk_tokens
            log_probs = []
            for start in range(0, ids.numel() - 1, step):
                chunk = ids[start : min(start + step, ids.numel() - 1)]
                logits = self.lm.model(chunk[None], past_key_values=cache, use_cache=True).logits
                targets = ids[start + 1 : start + 1 + chunk.numel()]
                nll += float(torch.nn.functional.cross_entropy(logits[0], targets, reduction="sum"))
                log_probs.append(torch.log_softmax(logits[0].float(), dim=-1))
            mine = torch.cat(log_probs)
            if recording:
                self.reference.append(mine.to(torch.float16))
            else:
                full = self.reference[index].float()
                kl += float((full.exp() * (full - mine)).sum())
            count += ids.numel() - 1
        return math.exp(nll / count), fp16 / stored, stored // len(self.windows), kl / count

    def measure(self, policy: CompressionPolicy, label: str = "") -> Measurement:
        perplexity, ratio, stored, kl = self._perplexity(policy)
        cost = perplexity / self.baseline - 1
        return Measurement(label or policy.name, policy, perplexity, cost, ratio, stored, kl)


def quantization_label(q: Quantization) -> str:
    """Short form for progress lines, e.g. 'K3/V2 groups 128/64, 32 sink tokens'."""
    bits = f"K{q.key_bits or 16}/V{q.value_bits or 16}"
    return f"{bits} groups {q.key_group_size}/{q.value_group_size}, {q.sink_tokens} sink tokens"


def merge_label(pair: PairMerge) -> str:
    kinds = "+".join(kind for kind in ("keys", "values") if getattr(pair, kind))
    return f"merge layers {pair.layers} {kinds}, t={pair.t}"


def with_pairs(policy: CompressionPolicy, pairs: Sequence[PairMerge]) -> CompressionPolicy:
    merge = MergePlan(pairs=tuple(pairs)) if pairs else None
    return replace(policy, merge=merge)


def merge_candidates(
    num_layers: int,
    t_values: Sequence[float],
    first_layers: Sequence[int] | None = None,
    kinds: Sequence[str] = MERGE_KINDS,
    window: int = 0,
) -> list[PairMerge]:
    """Each adjacent pair (or those starting at `first_layers`), each of `kinds` alone,
    each t, keeping `window` recent tokens unmerged; no retained tokens (a retained
    token is stored twice in 16-bit, which no ratio gain survives at these sizes)."""
    firsts = range(num_layers - 1) if first_layers is None else first_layers
    for first in firsts:
        if not 0 <= first < num_layers - 1:
            raise ValueError(f"no layer pair starts at {first} in a model of {num_layers} layers")
    return [
        PairMerge(
            first,
            keys=kind == "keys",
            values=kind == "values",
            t=t,
            retention=None,
            window=window,
        )
        for first in firsts
        for kind in kinds
        for t in t_values
    ]


def _combine(existing: Sequence[PairMerge], candidate: PairMerge) -> list[PairMerge] | None:
    """`existing` plus `candidate`; the same layer pair merging the other side joins it
    (same t only). None when the candidate overlaps a pair it cannot join."""
    pairs = list(existing)
    for index, pair in enumerate(pairs):
        if pair.layers == candidate.layers:
            if (
                pair.t != candidate.t
                or (pair.keys and candidate.keys)
                or (pair.values and candidate.values)
            ):
                return None
            pairs[index] = replace(pair, keys=True, values=True)
            return pairs
        if set(pair.layers) & set(candidate.layers):
            return None
    return [*pairs, candidate]


@dataclass(frozen=True)
class PolicyChange:
    """One step of the search: merge one side of a layer pair (`merge`), or store one
    layer's keys or values (`kind`) at fewer `bits`."""

    merge: PairMerge | None = None
    layer: int = -1
    kind: str = ""
    bits: int = 0

    @property
    def label(self) -> str:
        if self.merge is not None:
            return merge_label(self.merge)
        return f"layer {self.layer} {self.kind} at {self.bits} bits"

    def apply(self, policy: CompressionPolicy) -> CompressionPolicy | None:
        """`policy` with this change, or None where it conflicts with the policy."""
        if self.merge is not None:
            pairs = policy.merge.pairs if policy.merge else ()
            combined = _combine(pairs, self.merge)
            return None if combined is None else with_pairs(policy, combined)
        q = policy.quantization
        current = q.bits_for(self.kind, self.layer)
        if current is None or current <= self.bits:
            return None
        bits = {"keys": q.bits_for("keys", self.layer), "values": q.bits_for("values", self.layer)}
        bits[self.kind] = self.bits
        others = [o for o in q.layer_bits if o.layer != self.layer]
        overrides = sorted(
            [*others, LayerBits(self.layer, bits["keys"], bits["values"])], key=lambda o: o.layer
        )
        return replace(policy, quantization=replace(q, layer_bits=tuple(overrides)))


def policy_changes(
    policy: CompressionPolicy, num_layers: int, settings: CalibrationSettings
) -> list[PolicyChange]:
    """Every merge candidate, and every layer side one bit width below its current one."""
    changes = [
        PolicyChange(merge=pair)
        for pair in merge_candidates(
            num_layers,
            settings.t_values,
            settings.merge_first_layers,
            settings.merge_kinds,
            settings.merge_window,
        )
    ]
    q = policy.quantization
    for layer in range(num_layers if q is not None else 0):
        for kind in ("keys", "values"):
            current = q.bits_for(kind, layer)
            lower = [bits for bits in QUANT_BITS if current is not None and bits < current]
            if lower:
                changes.append(PolicyChange(layer=layer, kind=kind, bits=max(lower)))
    return changes


@dataclass
class CalibrationReport:
    model: str
    shape: ModelShape
    budget: float
    baseline_perplexity: float
    best: Measurement
    quantization: list[Measurement] = field(default_factory=list)
    single_changes: list[Measurement] = field(default_factory=list)
    # The winning search: its quantization start, then every change it kept.
    path: list[Measurement] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "shape": asdict(self.shape),
            "budget": self.budget,
            "baseline_perplexity": self.baseline_perplexity,
            "best": self.best.to_dict(),
            "quantization": [m.to_dict() for m in self.quantization],
            "single_changes": [m.to_dict() for m in self.single_changes],
            "path": [m.to_dict() for m in self.path],
            "seconds": self.seconds,
        }


def calibrate(
    lm: LoadedModel, settings: CalibrationSettings | None = None, bar: PhaseBar = no_bar
) -> CalibrationReport:
    """Search for the policy with the highest ratio within the budget; every measurement
    is logged, and each phase (prefix KV, quantization candidates, single changes, the
    greedy search) goes through `bar`."""
    settings = settings or CalibrationSettings()
    started = time.perf_counter()
    scorer = CalibrationScorer(lm, settings, bar)
    log.info("baseline perplexity %.3f on %d windows", scorer.baseline, settings.windows)

    def measured(policy: CompressionPolicy, label: str) -> Measurement:
        result = scorer.measure(policy, label)
        log.info("%s: cost %+.2f%%, ratio %.2f", label, 100 * result.cost, result.compression_ratio)
        return result

    candidates = settings.quantization_candidates
    quantization = [
        measured(CompressionPolicy("calibrated", quantization=q), quantization_label(q))
        for q in bar(candidates, "quantization candidates", len(candidates), "candidate")
    ]
    within = [m for m in quantization if m.cost <= settings.budget]
    if not within:
        raise ValueError(
            f"no quantization candidate stays within a {settings.budget:.2%} perplexity "
            "budget on this model; raise --budget"
        )
    finalists = sorted(within, key=lambda m: -m.compression_ratio)[
        : settings.quantization_finalists
    ]
    best_path = [finalists[0]]
    single_changes: list[Measurement] = []
    for start in [] if settings.quantization_only else finalists:
        changes = policy_changes(start.policy, lm.num_layers, settings)
        phase = f"single changes on {start.label}"
        singles = [
            (change, measured(change.apply(start.policy), "  " + change.label))
            for change in bar(changes, phase, len(changes), "candidate")
        ]
        single_changes.extend(m for _, m in singles)

        def cost_per_byte(
            single: tuple[PolicyChange, Measurement], start: Measurement = start
        ) -> float:
            saved = start.stored_bytes - single[1].stored_bytes
            return (single[1].cost - start.cost) / saved if saved > 0 else math.inf

        path = [start]
        ranked = sorted(singles, key=cost_per_byte)
        phase = f"greedy search from {start.label}"
        for change, single in bar(ranked, phase, len(ranked), "change"):
            current = path[-1]
            room = settings.budget - current.cost
            if single.cost - start.cost > room or cost_per_byte((change, single)) == math.inf:
                continue
            policy = change.apply(current.policy)
            if policy is None:
                continue
            trial = measured(policy, f"  + {change.label}")
            if (
                trial.cost <= settings.budget
                and trial.compression_ratio > current.compression_ratio
            ):
                path.append(trial)
        if path[-1].compression_ratio > best_path[-1].compression_ratio:
            best_path = path
    return CalibrationReport(
        model=lm.name,
        shape=lm.shape,
        budget=settings.budget,
        baseline_perplexity=scorer.baseline,
        best=best_path[-1],
        quantization=quantization,
        single_changes=single_changes,
        path=best_path,
        seconds=time.perf_counter() - started,
    )


def calibrated_policy(report: CalibrationReport, name: str = "calibrated") -> CompressionPolicy:
    """The report's best policy, named, described, and marked `calibrated_for` the
    model's shape: `policy_for_model` refuses it for any other model."""
    best = report.best
    return replace(
        best.policy,
        name=name,
        calibrated_for=report.shape,
        description=(
            f"calibrated on {report.model}: cost {best.cost:+.2%} (budget "
            f"{report.budget:.2%}), ratio {best.compression_ratio:.2f} on calibration text"
        ),
    )
