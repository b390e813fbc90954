"""Calibration of the transform codec: fit a model's cross-layer transform and choose
its settings under an accuracy budget (docs/design.md "Transform coding").

1. Fit: the KV of the 'search' essays' prefixes (keys with RoPE undone, the first
   `sink_tokens` of each window left out, as they stay exact) gives, per layer group
   and side, a mean and the principal components (eigenvectors of the covariance).
2. Build: for a group size, quantization steps (relative to the group's RMS) and an
   exact recent window, an artifact keeps the components whose standard deviation
   reaches `rank_threshold` steps and the Laplace scale of each component's codes.
3. Search, greedy: from a gentle start, the single changes (a coarser key step, a
   coarser value step, larger groups, a shorter window) are ranked by the ratio they
   give on the search prefixes (an encode, no model run); in that order each is scored
   on the 'search' windows by its mean KL divergence from the full cache through the
   decode-time path, and the first within the budget is scored on the 'validation'
   windows (other essays) and kept only if it stays within the budget there too. The
   search stops when no change is kept.

Both text halves are disjoint from the evaluation essays. The result is an artifact
(written by hash) and a policy naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from minicache_client.policy import CompressionPolicy, TransformPlan
from minicache_client.rope import RopeTable
from minicache_client.transform_artifact import (
    ARTIFACTS,
    GroupTransform,
    SideTransform,
    TransformArtifact,
    encode_artifact,
)
from minicache_worker.calibration import CalibrationScorer, CalibrationSettings, Measurement
from minicache_worker.evaluation import PhaseBar, flag_field, no_bar
from minicache_worker.models import LoadedModel, layer_kinds, rope_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransformSettings:
    budget: float = flag_field(
        0.006,
        "allowed mean KL divergence from the full cache, nats per scored token "
        "(about 0.01 is +1% perplexity)",
    )
    context_tokens: int = flag_field(1024, "tokens of each window's compressed prefix")
    scored_tokens: int = flag_field(256, "continuation tokens scored in each window")
    decode_chunk_tokens: int = flag_field(
        16, "continuation tokens per forward pass while scoring (stored as decode steps)"
    )
    windows: int = flag_field(4, "windows of search text every candidate is scored on")
    validation_windows: int = flag_field(3, "windows of validation text a kept change is scored on")
    sink_tokens: int = flag_field(16, "leading tokens kept exact")
    rank_threshold: float = flag_field(
        0.25, "a component is kept when its standard deviation reaches this many steps"
    )
    coder: str = flag_field("rans", "entropy coder of the codes: rans or zlib")
    group_sizes: tuple[int, ...] = (10, 15)
    key_steps: tuple[float, ...] = (0.25, 0.35, 0.5, 0.7, 1.0)
    value_steps: tuple[float, ...] = (0.6, 0.8, 1.0, 1.3, 1.7)
    recent_windows: tuple[int, ...] = (32, 16)

    def __post_init__(self) -> None:
        if not 0 < self.budget < 1:
            raise ValueError(f"budget must be in (0, 1) nats, got {self.budget}")
        if min(self.recent_windows) < self.decode_chunk_tokens:
            raise ValueError("an exact window must hold at least one decode chunk")

    def scorer_settings(self, windows: int) -> CalibrationSettings:
        return CalibrationSettings(
            context_tokens=self.context_tokens,
            scored_tokens=self.scored_tokens,
            decode_chunk_tokens=self.decode_chunk_tokens,
            windows=windows,
        )


@dataclass(frozen=True)
class Point:
    """Indices into the settings' choices: group size, key step, value step, window."""

    group: int = 0
    key: int = 0
    value: int = 0
    window: int = 0

    def moves(self, settings: TransformSettings) -> list[Point]:
        limits = {
            "group": len(settings.group_sizes),
            "key": len(settings.key_steps),
            "value": len(settings.value_steps),
            "window": len(settings.recent_windows),
        }
        return [
            replace(self, **{name: getattr(self, name) + 1})
            for name, limit in limits.items()
            if getattr(self, name) + 1 < limit
        ]

    def describe(self, settings: TransformSettings) -> dict[str, Any]:
        return {
            "group_layers": settings.group_sizes[self.group],
            "key_step": settings.key_steps[self.key],
            "value_step": settings.value_steps[self.value],
            "window": settings.recent_windows[self.window],
        }


def layer_groups(kinds: Sequence[str], size: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive groups of at most `size` layers, each of one layer kind (`kinds`:
    one per layer, models.layer_kinds): a run of one kind is cut into groups of `size`,
    the last one smaller."""
    groups: list[tuple[int, ...]] = []
    for layer, kind in enumerate(kinds):
        last = groups[-1] if groups else ()
        if last and kinds[last[0]] == kind and last[-1] == layer - 1 and len(last) < size:
            groups[-1] = (*last, layer)
        else:
            groups.append((layer,))
    return tuple(groups)


@dataclass
class GroupFit:
    mean: np.ndarray
    components: np.ndarray  # [dim, dim], columns by decreasing variance
    variances: np.ndarray
    samples: np.ndarray  # [tokens, dim] centred, for the codes' scales


class TransformFitter:
    """Means and principal components per layer group and side, from prefix KV."""

    def __init__(
        self,
        lm: LoadedModel,
        prefix_kv: Sequence[Sequence[tuple[Any, Any]]],
        sink_tokens: int,
        rope: Sequence[RopeTable],
    ) -> None:
        self.lm = lm
        self.rope = rope
        # Per layer and side: float32 [tokens, kv_heads * head_dim].
        self.vectors: list[dict[str, np.ndarray]] = []
        for layer in range(lm.num_layers):
            sides: dict[str, list[np.ndarray]] = {"keys": [], "values": []}
            for window in prefix_kv:
                keys, values = (np.asarray(a, dtype=np.float32) for a in window[layer])
                keys = rope[layer].rotate(keys, 0, inverse=True)
                for kind, array in (("keys", keys), ("values", values)):
                    kept = array[:, sink_tokens:]
                    sides[kind].append(kept.transpose(1, 0, 2).reshape(kept.shape[1], -1))
            self.vectors.append({kind: np.concatenate(parts) for kind, parts in sides.items()})
        self._fits: dict[tuple[tuple[int, ...], str], GroupFit] = {}

    def fit(self, layers: tuple[int, ...], kind: str) -> GroupFit:
        key = (layers, kind)
        if key not in self._fits:
            data = np.concatenate([self.vectors[layer][kind] for layer in layers], axis=1)
            mean = data.mean(axis=0)
            centred = data - mean
            covariance = (centred.T.astype(np.float64) @ centred) / len(centred)
            variances, components = np.linalg.eigh(covariance)
            order = np.argsort(variances)[::-1]
            self._fits[key] = GroupFit(
                mean.astype(np.float32),
                components[:, order].astype(np.float32),
                np.maximum(variances[order], 0.0),
                centred,
            )
        return self._fits[key]

    def side(self, layers: tuple[int, ...], kind: str, step: float, threshold: float):
        fit = self.fit(layers, kind)
        rms = float(np.sqrt(fit.variances.sum() / len(fit.variances)))
        absolute = step * rms
        rank = max(1, int((np.sqrt(fit.variances) >= threshold * absolute).sum()))
        basis = fit.components[:, :rank]
        # The basis is stored in float16: fit the scales to what is stored.
        basis = basis.astype(np.float16).astype(np.float32)
        codes = (fit.samples @ basis) / absolute
        scales = np.abs(codes).mean(axis=0).astype(np.float32)
        return SideTransform(fit.mean, basis, absolute, scales)

    def artifact(
        self,
        groups: Sequence[tuple[int, ...]],
        key_step: float,
        value_step: float,
        threshold: float,
        coder: str,
        calibration: dict[str, Any],
    ) -> TransformArtifact:
        return TransformArtifact(
            model=self.lm.name,
            shape=self.lm.shape,
            rope=tuple(self.rope),
            groups=tuple(
                GroupTransform(
                    layers,
                    self.side(layers, "keys", key_step, threshold),
                    self.side(layers, "values", value_step, threshold),
                )
                for layers in groups
            ),
            coder=coder,
            calibration=calibration,
        )


@dataclass
class TransformReport:
    model: str
    budget: float
    best: Point
    artifact: bytes
    digest: str
    policy: CompressionPolicy
    search: Measurement
    validation: Measurement | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "budget_kl": self.budget,
            "artifact": self.digest,
            "artifact_bytes": len(self.artifact),
            "policy": self.policy.to_dict(),
            "search": self.search.to_dict(),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "trials": self.trials,
            "seconds": self.seconds,
        }


def calibrate_transform(
    lm: LoadedModel,
    settings: TransformSettings | None = None,
    bar: PhaseBar = no_bar,
    name: str = "calibrated",
) -> TransformReport:
    settings = settings or TransformSettings()
    started = time.perf_counter()
    search = CalibrationScorer(lm, settings.scorer_settings(settings.windows), bar, "search")
    validation = CalibrationScorer(
        lm, settings.scorer_settings(settings.validation_windows), bar, "validation"
    )
    rope = rope_tables(lm)
    kinds = layer_kinds(lm)
    fitter = TransformFitter(lm, [w.prefix_kv for w in search.windows], settings.sink_tokens, rope)
    built: dict[Point, tuple[bytes, CompressionPolicy]] = {}
    trials: list[dict[str, Any]] = []

    def build(point: Point) -> tuple[bytes, CompressionPolicy]:
        if point not in built:
            chosen = point.describe(settings)
            groups = layer_groups(kinds, chosen["group_layers"])
            artifact = fitter.artifact(
                groups,
                chosen["key_step"],
                chosen["value_step"],
                settings.rank_threshold,
                settings.coder,
                {"settings": chosen},
            )
            data = encode_artifact(artifact)
            digest = ARTIFACTS.add(data)
            plan = TransformPlan(digest, groups, settings.sink_tokens, chosen["window"])
            built[point] = (data, CompressionPolicy(name, transform=plan))
        return built[point]

    def scored(point: Point, scorer: CalibrationScorer, text: str) -> Measurement:
        chosen = point.describe(settings)
        label = (
            f"groups of {chosen['group_layers']}, steps K {chosen['key_step']} / V "
            f"{chosen['value_step']}, window {chosen['window']} ({text})"
        )
        result = scorer.measure(build(point)[1], label)
        log.info(
            "%s: KL %.4f, perplexity %+.2f%%, ratio %.2f",
            label,
            result.kl,
            100 * result.cost,
            result.compression_ratio,
        )
        trials.append({**chosen, "text": text, **result.to_dict(), "policy": None})
        return result

    current = Point()
    current_search = scored(current, search, "search")
    current_validation = scored(current, validation, "validation")
    if max(current_search.kl, current_validation.kl) > settings.budget:
        raise ValueError(
            f"the gentlest setting costs KL {current_search.kl:.4f} (search) / "
            f"{current_validation.kl:.4f} (validation), over the budget {settings.budget}: "
            "raise --budget"
        )

    ratios: dict[Point, float] = {}

    def prefix_ratio(point: Point) -> float:
        """The ratio of `point` on the search windows' prefixes: an encode only."""
        if point in ratios:
            return ratios[point]
        stored = fp16 = 0
        for window in search.windows:
            encoder = search.stored_prefix(build(point)[1], window)
            stored += encoder.stored_bytes()
            fp16 += encoder.fp16_bytes()
        ratios[point] = fp16 / stored
        return ratios[point]

    rounds = bar(range(64), "transform search", 64, "round")
    for _ in rounds:
        ranked = sorted(current.moves(settings), key=prefix_ratio, reverse=True)
        kept = None
        for move in ranked:
            if prefix_ratio(move) <= current_search.compression_ratio:
                break
            result = scored(move, search, "search")
            if result.kl > settings.budget:
                continue
            checked = scored(move, validation, "validation")
            if checked.kl <= settings.budget:
                kept = (move, result, checked)
                break
        if kept is None:
            break
        current, current_search, current_validation = kept
    described = current.describe(settings)
    # The chosen transform again, now with what it measured: a new hash, the same codes.
    groups = layer_groups(kinds, described["group_layers"])
    measured = {
        "settings": described,
        "budget_kl": settings.budget,
        "search": {"kl": current_search.kl, "perplexity_increase": current_search.cost},
        "validation": {"kl": current_validation.kl, "perplexity_increase": current_validation.cost},
        "compression_ratio": current_search.compression_ratio,
    }
    artifact = fitter.artifact(
        groups,
        described["key_step"],
        described["value_step"],
        settings.rank_threshold,
        settings.coder,
        measured,
    )
    data = encode_artifact(artifact)
    digest = ARTIFACTS.add(data)
    plan = TransformPlan(digest, groups, settings.sink_tokens, described["window"])
    policy = CompressionPolicy(name, transform=plan)
    policy = replace(
        policy,
        calibrated_for=lm.shape,
        description=(
            f"transform coding calibrated on {lm.name}: groups of {described['group_layers']} "
            f"layers, steps K {described['key_step']} / V {described['value_step']} x RMS, "
            f"window {described['window']}; KL {current_validation.kl:.4f} on validation text "
            f"(budget {settings.budget}), ratio {current_search.compression_ratio:.2f}"
        ),
    )
    return TransformReport(
        model=lm.name,
        budget=settings.budget,
        best=current,
        artifact=data,
        digest=digest,
        policy=policy,
        search=current_search,
        validation=current_validation,
        trials=trials,
        seconds=time.perf_counter() - started,
    )
