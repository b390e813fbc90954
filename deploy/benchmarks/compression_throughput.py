"""Throughput of the MiniCache compression engine against a plain memory copy.

Measures, for each compression policy, in one run on the same data:

- encode: `SequenceEncoder.put_layer` for every layer, then `seal()`;
- restore: `SequenceEncoder.restore_all`: every layer, all tokens, to float16 (each
  layer group decoded once);
- copy (the baseline): `.copy()` of every layer's fp16 keys and values, the same bytes
  that encode reads and restore writes, into fresh arrays as restore's are. A second
  figure, `copyto` into preallocated arrays, shows the machine's bare copy bandwidth
  (no page faults); the ratio columns are against `.copy()`.

All three are reported in GB/s (1e9 bytes per second) of fp16-equivalent KV: the fp16
size of the whole cache (`SequenceEncoder.fp16_bytes()`, 2 x layers x kv_heads x tokens
x head_dim x 2 bytes) divided by the wall time (`time.perf_counter`). Each measurement
runs once as a warm-up, then `--repeats` times; the table shows the median and, in
parentheses, the best run (minimum time); the JSON has every run. The compression ratio is counted from the stored entries
(`SequenceEncoder.compression_ratio()`) outside the timed region.

Synthetic KV, seeded (`--seed`), shape `[kv_heads, tokens, head_dim]` per layer:

- values: standard normal;
- keys: standard normal, with 4 outlier channels per head scaled by 6 (as real keys
  have a few channels of much larger magnitude; they dominate the key norms and widen
  per-channel quantization ranges);
- correlated depth: a fraction (`--correlated-fraction`, default half) of layers l is
  rho * layer (l-1) + sqrt(1 - rho^2) * noise (rho = `--correlation`, default 0.9),
  so a merged pair that lands on one sees small angles (d = angle/pi ~ 0.14). In those
  layers a share of (head, token) units (`--distinct-tokens`, default 2%) instead
  points against the layer below (d ~ 0.97): the distinct tokens that retention
  (design.md section 3, top gamma of the min-max range) keeps unmerged. With the
  defaults the `paper` preset retains about 2% of the units of correlated pairs and a
  handful (the tails) of the others, so the retention gather/scatter paths do work.

`--kv model` uses real KV instead: the bundled SmolLM2's keys and values for the first
`--tokens` tokens of the evaluation essays (needs the worker package; the shape flags
are then the model's). The transform codec is calibrated on real KV, so its ratio and
its entropy coder's speed mean something only there; on synthetic KV its codes are
large and slow. `--coders rans zlib` measures each transform policy once per entropy
coder (its artifact re-encoded with the other coder, under another hash).

With `--device cuda` (needs CuPy) the arrays live on the GPU and every timer stops
after `cupy.cuda.Device().synchronize()`; the engine dispatches on the array
namespace, so the same code runs.

Defaults: SmolLM2-135M's KV shape (30 layers, 3 KV heads of 64), 4,096 tokens, every
preset, 5 repeats: about a minute on 2 CPU cores.

    python deploy/benchmarks/compression_throughput.py
    python deploy/benchmarks/compression_throughput.py --policies paper kivi4 --json out.json
    python deploy/benchmarks/compression_throughput.py --kv model --tokens 2048 \
        --policies none kivi4 default --coders rans zlib --json docs/transform_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
from arguments import positive_int  # beside this script

from minicache_client.entropy import CODERS
from minicache_client.policy import PRESETS, CompressionPolicy, load_policy
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_client.transform_artifact import ARTIFACTS, encode_artifact

DTYPE = "float16"
KEY_OUTLIER_CHANNELS = 4
KEY_OUTLIER_SCALE = 6.0
# Distinct tokens point almost exactly against the layer below (angle near pi).
DISTINCT_NOISE = 0.1


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    tokens: int

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.tokens * self.head_dim * 2


@dataclass(frozen=True)
class Timing:
    """Seconds of each repeat (warm-up excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


@dataclass
class PolicyResult:
    policy: str
    compression_ratio: float
    stored_bytes: int
    retained_units: int
    encode: Timing
    restore: Timing


# -- arguments ------------------------------------------------------------------------


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Encode and restore throughput of the MiniCache compression engine, "
        "in GB/s of fp16-equivalent KV, against a plain array copy of the same bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    shape = parser.add_argument_group("model shape (default: SmolLM2-135M)")
    shape.add_argument("--layers", type=positive_int, default=30, help="number of layers")
    shape.add_argument("--kv-heads", type=positive_int, default=3, help="KV heads per layer")
    shape.add_argument("--head-dim", type=positive_int, default=64, help="channels per head")
    parser.add_argument("--tokens", type=positive_int, default=4096, help="tokens per layer")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(PRESETS),
        metavar="POLICY",
        help=f"preset names ({', '.join(PRESETS)}) or policy JSON files",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed runs after one warm-up"
    )
    parser.add_argument(
        "--dtype", choices=[DTYPE], default=DTYPE, help="KV dtype of the input and restore"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: NumPy arrays; cuda: CuPy arrays on the current GPU",
    )
    parser.add_argument(
        "--kv",
        choices=["synthetic", "model"],
        default="synthetic",
        help="synthetic: seeded random KV of the shape flags; model: the bundled SmolLM2's "
        "KV of evaluation text (the shape flags are then the model's)",
    )
    parser.add_argument(
        "--coders",
        nargs="+",
        choices=CODERS,
        default=None,
        metavar="CODER",
        help=f"measure each transform policy with each of these entropy coders ({CODERS}); "
        "default: the coder its artifact names",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic KV")
    data = parser.add_argument_group("synthetic KV")
    data.add_argument(
        "--correlated-fraction",
        type=_unit_float,
        default=0.5,
        help="fraction of layers correlated with the layer below",
    )
    data.add_argument(
        "--correlation",
        type=_unit_float,
        default=0.9,
        help="rho between a correlated layer and the layer below",
    )
    data.add_argument(
        "--distinct-tokens",
        type=_unit_float,
        default=0.02,
        help="share of (head, token) units of a correlated layer pointing against the layer below",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ModuleType]:
    """Parsed arguments and the array module (numpy or cupy); argparse errors on bad
    input, before any data is generated."""
    parser = build_parser()
    args = parser.parse_args(argv)
    xp: ModuleType = np
    if args.device == "cuda":
        try:
            import cupy
        except ImportError:
            parser.error("--device cuda needs CuPy (pip install cupy-cuda12x); it is not installed")
        try:
            cupy.cuda.Device().synchronize()
        except Exception as exc:  # CuPy raises several driver/runtime error types.
            parser.error(f"--device cuda: no usable GPU ({exc})")
        xp = cupy
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: folder {folder} does not exist")
    if args.kv == "model":
        args.layers, args.kv_heads, args.head_dim = 30, 3, 64  # SmolLM2-135M
    args.shape = ModelShape(args.layers, args.kv_heads, args.head_dim, args.tokens)
    policies: list[CompressionPolicy] = []
    for name in dict.fromkeys(args.policies):
        try:
            policy = load_policy(name)
            # Resolving the layer groups checks the policy against the model shape.
            _new_encoder(policy, args.shape)
        except ValueError as exc:
            parser.error(f"--policies {name}: {exc}")
        policies.extend(coder_variants(policy, args.coders))
    args.policy_objects = policies
    return args, xp


def coder_variants(policy: CompressionPolicy, coders: list[str] | None) -> list[CompressionPolicy]:
    """`policy`, or for a transform policy one copy per coder: its artifact re-encoded
    with that coder (registered under its own hash), named `policy (coder)`."""
    if policy.transform is None or not coders:
        return [policy]
    artifact = ARTIFACTS.get(policy.transform.artifact)
    variants = []
    for coder in coders:
        digest = ARTIFACTS.add(encode_artifact(replace(artifact, coder=coder)))
        variants.append(
            replace(
                policy,
                name=f"{policy.name} ({coder})",
                transform=replace(policy.transform, artifact=digest),
            )
        )
    return variants


# -- data -----------------------------------------------------------------------------


def synthetic_kv(
    shape: ModelShape,
    *,
    seed: int,
    correlated_fraction: float,
    correlation: float,
    distinct_tokens: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer float16 keys and values, `[kv_heads, tokens, head_dim]` each (host)."""
    rng = np.random.default_rng(seed)
    dims = (shape.kv_heads, shape.tokens, shape.head_dim)
    outliers = min(KEY_OUTLIER_CHANNELS, shape.head_dim)
    outlier_channels = [
        rng.choice(shape.head_dim, size=outliers, replace=False) for _ in range(shape.kv_heads)
    ]
    # Layer 0 has no layer below; of the others, exactly this fraction is correlated.
    correlated = np.zeros(shape.num_layers, dtype=bool)
    count = round(correlated_fraction * (shape.num_layers - 1))
    correlated[1 + rng.choice(shape.num_layers - 1, size=count, replace=False)] = True
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for layer in range(shape.num_layers):
        fresh = [rng.standard_normal(dims, dtype=np.float32) for _ in range(2)]
        if correlated[layer] and previous is not None:
            mixed = []
            for before, noise in zip(previous, fresh, strict=True):
                blend = correlation * before + np.sqrt(1 - correlation**2) * noise
                distinct = rng.random(dims[:2]) < distinct_tokens
                blend[distinct] = DISTINCT_NOISE * noise[distinct] - before[distinct]
                mixed.append(blend)
            fresh = mixed
        previous = (fresh[0], fresh[1])
        # Scaled after the chain, per channel: angles between layers are unchanged
        # (distinct tokens stay opposite), magnitudes and channel ranges are not.
        layer_keys = fresh[0].copy()
        for head, channels in enumerate(outlier_channels):
            layer_keys[head][:, channels] *= KEY_OUTLIER_SCALE
        keys.append(layer_keys.astype(np.float16))
        values.append(fresh[1].astype(np.float16))
    return keys, values


def model_kv(tokens: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The bundled SmolLM2's float16 KV of the first `tokens` tokens of the evaluation
    essays, `[kv_heads, tokens, head_dim]` per layer (host)."""
    import torch
    from transformers import DynamicCache

    from minicache_worker.models import load_model
    from minicache_worker.texts import split_text

    lm = load_model("smollm2")
    ids = lm.tokenizer(split_text("evaluation"), return_tensors="pt").input_ids[0, :tokens]
    if ids.numel() < tokens:
        raise SystemExit(f"--tokens {tokens}: the evaluation text has {ids.numel()} tokens")
    cache = DynamicCache()
    with torch.inference_mode():
        lm.model(ids[None], past_key_values=cache, use_cache=True)
    keys = [layer.keys[0].to(torch.float16).numpy() for layer in cache.layers]
    values = [layer.values[0].to(torch.float16).numpy() for layer in cache.layers]
    return keys, values


# -- timing ---------------------------------------------------------------------------


def _synchronize(xp: ModuleType) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def timed(run: Callable[[], Any], repeats: int, xp: ModuleType) -> tuple[Timing, Any]:
    """One warm-up, then `repeats` timed runs; returns the timing and the last result."""
    result = run()
    _synchronize(xp)
    seconds = []
    for _ in range(repeats):
        # Free the previous result first, so every run allocates into the same state.
        result = None
        _synchronize(xp)
        start = time.perf_counter()
        result = run()
        _synchronize(xp)
        seconds.append(time.perf_counter() - start)
    return Timing(seconds), result


def _new_encoder(policy: CompressionPolicy, shape: ModelShape) -> SequenceEncoder:
    return SequenceEncoder(
        policy,
        num_layers=shape.num_layers,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=DTYPE,
    )


def encode(policy: CompressionPolicy, shape: ModelShape, keys: list, values: list):
    encoder = _new_encoder(policy, shape)
    for layer in range(shape.num_layers):
        encoder.put_layer(layer, keys[layer], values[layer])
    encoder.seal()
    return encoder


def restore(encoder: SequenceEncoder, shape: ModelShape) -> list:
    """Every layer, all tokens, to float16; a merged pair's direction decoded once."""
    return encoder.restore_all(0, shape.tokens, DTYPE)


def copy_all(keys: list, values: list) -> list:
    """Fresh copies, as restore returns fresh arrays."""
    return [(k.copy(), v.copy()) for k, v in zip(keys, values, strict=True)]


def copy_into(keys: list, values: list, xp: ModuleType) -> Callable[[], None]:
    """Copies into arrays allocated once: the bare copy bandwidth."""
    sources = [*keys, *values]
    targets = [xp.empty_like(source) for source in sources]

    def run() -> None:
        for target, source in zip(targets, sources, strict=True):
            xp.copyto(target, source)

    return run


@dataclass(frozen=True)
class Baseline:
    copy: Timing
    copyto: Timing


def retained_units(encoder: SequenceEncoder) -> int:
    return sum(
        getattr(codec, "retained_count", 0) for entry in encoder.entries for codec in entry.codecs()
    )


def benchmark_policy(
    policy: CompressionPolicy, shape: ModelShape, keys: list, values: list, repeats: int, xp
) -> PolicyResult:
    encode_timing, encoder = timed(lambda: encode(policy, shape, keys, values), repeats, xp)
    restore_timing, _ = timed(lambda: restore(encoder, shape), repeats, xp)
    if encoder.fp16_bytes() != shape.fp16_bytes:
        raise RuntimeError(
            f"{policy.name}: encoder counts {encoder.fp16_bytes()} fp16 bytes, "
            f"expected {shape.fp16_bytes}"
        )
    return PolicyResult(
        policy=policy.name,
        compression_ratio=encoder.compression_ratio(),
        stored_bytes=encoder.stored_bytes(),
        retained_units=retained_units(encoder),
        encode=encode_timing,
        restore=restore_timing,
    )


# -- report ---------------------------------------------------------------------------


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def machine_info(xp: ModuleType) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if xp is not np:
        properties = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        info["cupy"] = xp.__version__
        info["gpu"] = properties["name"].decode()
    return info


def _rates(timing: Timing, nbytes: int) -> str:
    return f"{gbps(nbytes, timing.median):.3f} ({gbps(nbytes, timing.best):.3f})"


def format_table(results: list[PolicyResult], baseline: Baseline, nbytes: int) -> str:
    """One row per policy; GB/s as median (best) over the repeats."""
    copy_rate = gbps(nbytes, baseline.copy.median)
    header = (
        "policy",
        "ratio",
        "encode GB/s",
        "restore GB/s",
        "encode/copy",
        "restore/copy",
    )
    rows = []
    for result in results:
        rows.append(
            (
                result.policy,
                f"{result.compression_ratio:.2f}x",
                _rates(result.encode, nbytes),
                _rates(result.restore, nbytes),
                f"{gbps(nbytes, result.encode.median) / copy_rate:.3f}",
                f"{gbps(nbytes, result.restore.median) / copy_rate:.3f}",
            )
        )
    copy = _rates(baseline.copy, nbytes)
    copyto = _rates(baseline.copyto, nbytes)
    rows.append(("copy (baseline)", "-", copy, copy, "1", "1"))
    rows.append(("copyto, preallocated", "-", copyto, copyto, "-", "-"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def report_json(
    args: argparse.Namespace,
    xp: ModuleType,
    results: list[PolicyResult],
    baseline: Baseline,
    wall_seconds: float,
) -> dict[str, Any]:
    nbytes = args.shape.fp16_bytes

    def figures(timing: Timing) -> dict[str, Any]:
        return {
            "seconds": timing.seconds,
            "median_seconds": timing.median,
            "min_seconds": timing.best,
            "median_gbps": gbps(nbytes, timing.median),
            "best_gbps": gbps(nbytes, timing.best),
        }

    copy_rate = gbps(nbytes, baseline.copy.median)
    return {
        "benchmark": "compression_throughput",
        "units": "GB/s = 1e9 bytes of fp16-equivalent KV per second",
        "machine": machine_info(xp),
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "num_layers": args.shape.num_layers,
            "kv_heads": args.shape.kv_heads,
            "head_dim": args.shape.head_dim,
            "tokens": args.shape.tokens,
            "fp16_bytes": nbytes,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "kv": args.kv,
            "seed": args.seed,
            "correlated_fraction": args.correlated_fraction,
            "correlation": args.correlation,
            "distinct_tokens": args.distinct_tokens,
        },
        "baseline": {"copy": figures(baseline.copy), "copyto": figures(baseline.copyto)},
        "policies": [
            {
                "policy": result.policy,
                "compression_ratio": result.compression_ratio,
                "stored_bytes": result.stored_bytes,
                "retained_units": result.retained_units,
                "encode": figures(result.encode),
                "restore": figures(result.restore),
                "encode_over_copy": gbps(nbytes, result.encode.median) / copy_rate,
                "restore_over_copy": gbps(nbytes, result.restore.median) / copy_rate,
            }
            for result in results
        ],
        "wall_seconds": wall_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args, xp = parse_args(argv)
    shape: ModelShape = args.shape
    began = time.perf_counter()
    if args.kv == "model":
        host_keys, host_values = model_kv(shape.tokens)
    else:
        host_keys, host_values = synthetic_kv(
            shape,
            seed=args.seed,
            correlated_fraction=args.correlated_fraction,
            correlation=args.correlation,
            distinct_tokens=args.distinct_tokens,
        )
    keys = [xp.asarray(k) for k in host_keys]
    values = [xp.asarray(v) for v in host_values]
    del host_keys, host_values
    print(
        f"KV: {shape.num_layers} layers x {shape.kv_heads} KV heads x {shape.tokens} tokens "
        f"x {shape.head_dim} dims, {args.dtype}, {shape.fp16_bytes / 2**20:.1f} MiB; "
        f"device {args.device}; GB/s of fp16 KV, median (best) of {args.repeats} runs "
        "after 1 warm-up",
        flush=True,
    )
    baseline = Baseline(
        copy=timed(lambda: copy_all(keys, values), args.repeats, xp)[0],
        copyto=timed(copy_into(keys, values, xp), args.repeats, xp)[0],
    )
    results = []
    for policy in args.policy_objects:
        measured = time.perf_counter()
        results.append(benchmark_policy(policy, shape, keys, values, args.repeats, xp))
        took = time.perf_counter() - measured
        print(f"  measured {policy.name} in {took:.1f} s", file=sys.stderr, flush=True)
    print(format_table(results, baseline, shape.fp16_bytes))
    wall = time.perf_counter() - began
    print(f"wall time {wall:.1f} s")
    if args.json:
        document = report_json(args, xp, results, baseline, wall)
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
