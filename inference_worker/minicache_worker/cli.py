"""`minicache-worker`: the inference worker service, and accuracy evaluation and
calibration of compression policies.

    minicache-worker demo
    minicache-worker serve --model smollm2 --cache-target 127.0.0.1:50051 --insecure 1
    minicache-worker eval --model smollm2 --policy default --json out.json
    minicache-worker eval --model smollm2 --policy all --json all.json --plot pareto.png
    minicache-worker calibrate --model smollm2 --out policy.json --report report.json

`--model` takes the bundled model's name, a local .gguf file, or a local Hugging Face
model directory. `--policy` takes a preset name, a policy JSON file, or `all` (every
preset); repeat it to compare several in one run against one shared baseline. `serve`
reads every setting from a flag or its MINICACHE_WORKER_<NAME> env var (docs/worker.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from minicache_client.policy import PRESETS, CompressionPolicy, load_policy

CALIBRATION_FLAGS = (
    "budget",
    "context_tokens",
    "scored_tokens",
    "decode_chunk_tokens",
    "windows",
    "merge_window",
)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _policies(specs: list[str]) -> list[CompressionPolicy]:
    policies: list[CompressionPolicy] = []
    for spec in specs:
        chosen = list(PRESETS.values()) if spec == "all" else [load_policy(spec)]
        policies.extend(policy for policy in chosen if policy not in policies)
    return policies


def format_table(results: list[dict[str, Any]]) -> str:
    header = (
        f"{'policy':<14} {'ratio':>6} {'perplexity':>10} {'full':>8} {'increase':>9} "
        f"{'needle':>7} {'full':>5} {'greedy':>7}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r['policy']:<14} {r['compression_ratio']:>6.2f} {r['perplexity']:>10.3f} "
            f"{r['perplexity_full']:>8.3f} {r['perplexity_increase']:>+9.2%} "
            f"{r['needle_accuracy']:>7.0%} {r['needle_accuracy_full']:>5.0%} "
            f"{r['greedy_agreement']:>7.1%}"
        )
    return "\n".join(rows)


def write_plot(
    points: list[tuple[str, float, float]],
    path: Path,
    title: str,
    curve: list[tuple[float, float]] = (),
) -> None:
    """Compression ratio against perplexity increase: labelled (label, ratio, increase)
    points, and optionally a curve of (ratio, increase) drawn through its points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'minicache-worker[plot]'") from exc
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, ratio, increase in points:
        axes.scatter([ratio], [100 * increase], s=30)
        axes.annotate(
            label, (ratio, 100 * increase), textcoords="offset points", xytext=(5, 4), fontsize=7
        )
    if curve:
        axes.plot(
            [ratio for ratio, _ in curve],
            [100 * increase for _, increase in curve],
            marker=".",
            color="black",
            linewidth=1,
            label="calibration: greedy steps",
        )
        axes.legend(fontsize=8)
    # Linear within ±2 %, logarithmic beyond: small and large damage on one axis.
    axes.set_yscale("symlog", linthresh=2.0, linscale=2.0)
    shown = [100 * increase for _, _, increase in points] + [100 * i for _, i in curve]
    low, high = min([0.0, *shown]), max([2.0, *shown])
    ticks = [
        t
        for t in (-5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
        if low - 1 <= t <= 2 * high
    ]
    axes.set_yticks(ticks, [f"{tick:g}" for tick in ticks])
    axes.axhline(2.0, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("compression ratio (fp16 bytes / stored bytes)")
    axes.set_ylabel("perplexity increase vs full cache (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, linewidth=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_eval(args: argparse.Namespace) -> int:
    from minicache_worker.evaluation import EvalSettings, Evaluator
    from minicache_worker.models import load_model

    policies = _policies(args.policy)
    settings = EvalSettings(**{f.name: getattr(args, f.name) for f in fields(EvalSettings)})
    _progress(f"loading {args.model}")
    evaluator = Evaluator(load_model(args.model), settings)
    results = []
    for policy in policies:
        _progress(f"evaluating {policy.name}")
        results.append(evaluator.evaluate(policy))
        _progress(format_table(results[-1:]).splitlines()[-1])
    print(format_table(results))
    if args.json:
        _write_json(args.json, results[0] if len(results) == 1 else results)
    if args.plot:
        first = results[0]
        write_plot(
            [(r["policy"], r["compression_ratio"], r["perplexity_increase"]) for r in results],
            args.plot,
            f"{first['model']}: {first['context_tokens']}-token prefix, held-out essays",
        )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from minicache_worker.calibration import CalibrationSettings, calibrate, calibrated_policy
    from minicache_worker.models import load_model

    settings = CalibrationSettings(
        **{name: getattr(args, name) for name in CALIBRATION_FLAGS},
        merge_kinds=tuple(kind.strip() for kind in args.merge_kinds.split(",")),
        quantization_only=args.quantization_only,
    )
    _progress(f"loading {args.model}")
    report = calibrate(load_model(args.model), settings, _progress)
    policy = calibrated_policy(report, args.name)
    _write_json(args.out, policy.to_dict())
    if args.report:
        _write_json(args.report, report.to_dict())
    if args.plot:
        write_plot(
            [(m.label, m.compression_ratio, m.cost) for m in report.quantization],
            args.plot,
            f"calibration on {report.model}: quantization candidates and greedy steps",
            [(m.compression_ratio, m.cost) for m in report.path],
        )
    print(
        f"{args.out}: cost {report.best.cost:+.2%} (budget {settings.budget:.2%}), "
        f"compression ratio {report.best.compression_ratio:.2f} on calibration text, "
        f"{len(report.best.policy.merge.pairs) if report.best.policy.merge else 0} merged pairs"
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then drain: health NOT_SERVING at once, waiting
    turns refused, the running turn given MINICACHE_WORKER_GRACE_S to finish."""
    from minicache_server.logs import configure_logging
    from minicache_worker.worker_service import start_worker
    from minicache_worker.worker_settings import settings_from

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("minicache_worker")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    worker = start_worker(settings)
    try:
        stopping.wait()
        log.info("shutting down", extra={"grace_s": settings.grace_s})
    finally:
        worker.stop()
    log.info("stopped")
    return 0


def _add_settings(
    parser: argparse.ArgumentParser, settings: type, names: tuple[str, ...] | None = None
) -> None:
    """One flag per numeric field of a settings dataclass, defaulting to its default."""
    for field in fields(settings):
        if names is None or field.name in names:
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                type=type(field.default),
                default=field.default,
                dest=field.name,
            )


def build_parser() -> argparse.ArgumentParser:
    from minicache_worker import demo as demo_module
    from minicache_worker.calibration import MERGE_KINDS, CalibrationSettings
    from minicache_worker.evaluation import EvalSettings
    from minicache_worker.worker_settings import settings_parser

    parser = argparse.ArgumentParser(prog="minicache-worker", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the worker service (every flag also reads MINICACHE_WORKER_<FLAG>)",
    )
    settings_parser(serve)
    serve.set_defaults(handler=run_serve)

    demo = commands.add_parser(
        "demo",
        help="start Redis, a cache server and a worker, replay ShareGPT conversations "
        "through them, print what the cache service did, stop everything",
    )
    demo_module.add_arguments(demo)
    demo.set_defaults(handler=demo_module.run)

    model_help = "bundled model name (smollm2), a local .gguf file or a local HF model directory"
    evaluate = commands.add_parser("eval", help="measure what policies cost in accuracy")
    evaluate.add_argument("--model", default="smollm2", help=model_help)
    evaluate.add_argument(
        "--policy",
        action="append",
        required=True,
        help="preset name, policy JSON file, or 'all'; repeat to compare several",
    )
    evaluate.add_argument("--json", type=Path, help="write the results here")
    evaluate.add_argument("--plot", type=Path, help="write a PNG of ratio vs perplexity increase")
    _add_settings(evaluate, EvalSettings)
    evaluate.set_defaults(handler=run_eval)

    cal = commands.add_parser("calibrate", help="build a policy within an accuracy budget")
    cal.add_argument("--model", default="smollm2", help=model_help)
    cal.add_argument("--out", type=Path, required=True, help="where to write the policy JSON")
    cal.add_argument("--report", type=Path, help="write every measurement here")
    cal.add_argument("--name", default="calibrated", help="name of the written policy")
    cal.add_argument("--plot", type=Path, help="write a PNG of the candidates and the search")
    cal.add_argument(
        "--merge-kinds",
        default=",".join(MERGE_KINDS),
        help="which sides candidate merges merge: keys, values or keys,values",
    )
    cal.add_argument(
        "--quantization-only",
        action="store_true",
        help="only pick the best quantization candidate within the budget (minutes); "
        "without it, per-pair merges and per-layer bit widths are searched too (an hour)",
    )
    _add_settings(cal, CalibrationSettings, CALIBRATION_FLAGS)
    cal.set_defaults(handler=run_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minicache_worker.models import UnsupportedModelError

    try:
        return args.handler(args)
    except (UnsupportedModelError, ValueError, OSError) as exc:
        print(f"minicache-worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
