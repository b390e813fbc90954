"""`minicache-worker`: the inference worker service, and accuracy evaluation and
calibration of compression policies.

    minicache-worker demo
    minicache-worker serve --cache-targets 127.0.0.1:50051 --cache-insecure --insecure
    minicache-worker serve --print-config
    minicache-worker eval --model smollm2 --policy default --json out.json
    minicache-worker eval --model smollm2 --policy all --json all.json --plot pareto.png
    minicache-worker calibrate --model smollm2 --out policy.json --report report.json
    minicache-worker calibrate-transform --model smollm2 --out policy.json --artifact-dir DIR

`--model` takes the bundled model's name, a local .gguf file, or a local Hugging Face
model directory. `--policy` takes a preset name, a policy JSON file, or `all` (every
preset); repeat it to compare several in one run against one shared baseline. `serve`
reads every setting from a flag or its MINICACHE_WORKER_<NAME> env var (docs/worker.md).
`eval` and `calibrate` log to stderr and draw a progress bar per phase there when it is
a terminal (`--progress`); results go to stdout and the files named.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from minicache_client.policy import FALLBACK_POLICY, PRESETS, CompressionPolicy, load_policy

CALIBRATION_FLAGS = (
    "budget",
    "context_tokens",
    "scored_tokens",
    "decode_chunk_tokens",
    "windows",
    "merge_window",
)

# Exit statuses of `eval` (and of every command for EXIT_USAGE).
EXIT_OK = 0
EXIT_POLICY_FAILED = 1  # some policy's row is an error row; the JSON is written anyway
EXIT_USAGE = 2  # nothing ran: a bad flag, policy file or model
EVAL_EXIT_STATUS = (
    f"Exit status: {EXIT_OK} when every policy ran; {EXIT_POLICY_FAILED} when any policy did "
    f"not fit the model or failed (its row in the table and the JSON is an error row, the "
    f"other policies still run and --json is written); {EXIT_USAGE} when nothing ran (a bad "
    f"flag, policy name or file, or a model that cannot be loaded)."
)
PROGRESS_MODES = {"auto": None, "always": False, "never": True}  # tqdm's `disable`

log = logging.getLogger("minicache_worker")
Item = TypeVar("Item")


class TerminalBars:
    """Progress bars on stderr, one per phase, with rate and ETA (tqdm). Nested phases
    stack below the outermost one, which alone stays on screen when done."""

    def __init__(self, mode: str = "auto") -> None:
        self.disable = PROGRESS_MODES[mode]
        self.open = 0

    def __call__(self, items: Iterable[Item], phase: str, total: int, unit: str) -> Iterator[Item]:
        from tqdm import tqdm

        bar = tqdm(
            items,
            desc=phase,
            total=total,
            unit=unit,
            leave=self.open == 0,
            disable=self.disable,  # None: only when stderr is a terminal
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.open += 1
        try:
            yield from bar
        finally:
            self.open -= 1
            bar.close()


@contextmanager
def _console_logging() -> Iterator[None]:
    """The worker's INFO log on stderr for one command, written above any progress bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _policies(specs: list[str]) -> list[CompressionPolicy]:
    policies: list[CompressionPolicy] = []
    for spec in specs:
        chosen = list(PRESETS.values()) if spec == "all" else [load_policy(spec)]
        policies.extend(policy for policy in chosen if policy not in policies)
    return policies


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per row; a policy that fell back shows as 'default (as kivi4_sink)', an
    error row as its policy and the error."""
    from minicache_worker.evaluation import policy_label

    width = max([14, *(len(policy_label(r)) for r in results)])
    header = (
        f"{'policy':<{width}} {'ratio':>6} {'perplexity':>10} {'full':>8} {'increase':>9} "
        f"{'needle':>7} {'full':>5} {'greedy':>7}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            rows.append(f"{policy_label(r):<{width}} error: {r['error']}")
            continue
        rows.append(
            f"{policy_label(r):<{width}} {r['compression_ratio']:>6.2f} {r['perplexity']:>10.3f} "
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
    """Evaluate every policy; see EVAL_EXIT_STATUS for what the status means."""
    from minicache_worker.evaluation import EvalSettings, Evaluator, evaluate_each, policy_label
    from minicache_worker.models import load_model

    policies = _policies(args.policy)
    settings = EvalSettings(**{f.name: getattr(args, f.name) for f in fields(EvalSettings)})
    with _console_logging():
        log.info("loading %s", args.model)
        lm = load_model(args.model)
        shape = lm.shape
        log.info(
            "%s: %d layers, %d KV heads of %d",
            args.model,
            shape.num_layers,
            shape.kv_heads,
            shape.head_dim,
        )
        evaluator = Evaluator(lm, settings, TerminalBars(args.progress))
        results = evaluate_each(evaluator, policies)
        print(format_table(results))
        if args.json:
            _write_json(args.json, results[0] if len(results) == 1 else results)
        ran = [r for r in results if "error" not in r]
        if args.plot and ran:
            first = ran[0]
            write_plot(
                [(policy_label(r), r["compression_ratio"], r["perplexity_increase"]) for r in ran],
                args.plot,
                f"{first['model']}: {first['context_tokens']}-token prefix, held-out essays",
            )
        elif args.plot:
            log.warning("no policy ran: %s not written", args.plot)
        failed = [r["policy"] for r in results if "error" in r]
        if failed:
            log.error("%d of %d policies failed: %s", len(failed), len(results), ", ".join(failed))
            return EXIT_POLICY_FAILED
    return EXIT_OK


def run_calibrate(args: argparse.Namespace) -> int:
    from minicache_worker.calibration import CalibrationSettings, calibrate, calibrated_policy
    from minicache_worker.models import load_model

    settings = CalibrationSettings(
        **{name: getattr(args, name) for name in CALIBRATION_FLAGS},
        merge_kinds=tuple(kind.strip() for kind in args.merge_kinds.split(",")),
        quantization_only=args.quantization_only,
    )
    with _console_logging():
        log.info("loading %s", args.model)
        report = calibrate(load_model(args.model), settings, TerminalBars(args.progress))
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
    shape = report.shape
    print(
        f"{args.out}: cost {report.best.cost:+.2%} (budget {settings.budget:.2%}), "
        f"compression ratio {report.best.compression_ratio:.2f} on calibration text, "
        f"{len(report.best.policy.merge.pairs) if report.best.policy.merge else 0} merged pairs; "
        f"for models of {shape.num_layers} layers x {shape.kv_heads} KV heads x "
        f"{shape.head_dim} only"
    )
    return EXIT_OK


TRANSFORM_FLAGS = (
    "budget",
    "context_tokens",
    "scored_tokens",
    "decode_chunk_tokens",
    "windows",
    "validation_windows",
    "sink_tokens",
    "rank_threshold",
    "coder",
)


def run_calibrate_transform(args: argparse.Namespace) -> int:
    from minicache_client.transform_artifact import ARTIFACT_SUFFIX
    from minicache_worker.models import load_model
    from minicache_worker.transform_calibration import TransformSettings, calibrate_transform

    settings = TransformSettings(**{name: getattr(args, name) for name in TRANSFORM_FLAGS})
    with _console_logging():
        log.info("loading %s", args.model)
        report = calibrate_transform(
            load_model(args.model), settings, TerminalBars(args.progress), args.name
        )
        args.artifact_dir.mkdir(parents=True, exist_ok=True)
        artifact_path = args.artifact_dir / f"{report.digest}{ARTIFACT_SUFFIX}"
        artifact_path.write_bytes(report.artifact)
        _write_json(args.out, report.policy.to_dict())
        if args.report:
            _write_json(args.report, report.to_dict())
        if args.plot:
            write_plot(
                [
                    (
                        f"{t['group_layers']}L K{t['key_step']} V{t['value_step']} "
                        f"w{t['window']} {t['text'][0]}",
                        t["compression_ratio"],
                        t["cost"],
                    )
                    for t in report.trials
                ],
                args.plot,
                f"transform calibration on {report.model}: every trial (s: search, v: validation)",
            )
    print(
        f"{args.out}: KL {report.validation.kl:.4f} nats on validation text (budget "
        f"{settings.budget}), perplexity {report.validation.cost:+.2%}, compression ratio "
        f"{report.search.compression_ratio:.2f}; artifact {artifact_path} "
        f"({len(report.artifact) / 1e6:.1f} MB) in {report.seconds / 60:.1f} min"
    )
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then drain: health NOT_SERVING at once, waiting
    turns refused, the running turn given MINICACHE_WORKER_GRACE_S to finish."""
    from minicache_client.serving.logs import configure_logging
    from minicache_client.serving.settings import config_json
    from minicache_worker.worker_service import start_worker
    from minicache_worker.worker_settings import settings_from

    settings = settings_from(args)
    if args.print_config:
        print(config_json(settings))
        return EXIT_OK
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
    """One flag per numeric field of a settings dataclass, defaulting to its default,
    with the help text in the field's metadata."""
    for field in fields(settings):
        if names is None or field.name in names:
            help_text = field.metadata["help"].replace("%", "%%")
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                type=type(field.default),
                default=field.default,
                dest=field.name,
                metavar=field.type.upper() if isinstance(field.type, str) else None,
                help=f"{help_text} (default: %(default)s)",
            )


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=tuple(PROGRESS_MODES),
        default="auto",
        help="progress bars on stderr, one per phase, with an ETA: auto draws them only "
        "when stderr is a terminal, always also into a pipe or file, never not at all; "
        "log lines go to stderr either way (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    from minicache_worker import demo as demo_module
    from minicache_worker.calibration import MERGE_KINDS, CalibrationSettings
    from minicache_worker.evaluation import EvalSettings
    from minicache_worker.transform_calibration import TransformSettings
    from minicache_worker.worker_settings import settings_parser

    summary, _, usage = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="minicache-worker",
        description=textwrap.fill(" ".join(summary.split()), 80),
        epilog="examples:\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the worker service (every flag also reads MINICACHE_WORKER_<NAME>)",
        description="Run the inference worker's gRPC service until SIGTERM or SIGINT: each "
        "turn restores the session's KV from the cache service, generates, and stores the "
        "new KV back. Every flag also reads the env var MINICACHE_WORKER_<NAME> (shown with "
        "each flag); a flag wins over its env var, which wins over the default. A bad value "
        f"stops start-up naming its variable (exit status {EXIT_USAGE}).",
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

    model_help = (
        "the model: the bundled model's name (smollm2), a local .gguf file or a local "
        "Hugging Face model directory (default: %(default)s)"
    )
    evaluate = commands.add_parser(
        "eval",
        help="measure what policies cost in accuracy",
        description="Measure what each policy costs in perplexity, passkey retrieval and "
        "greedy agreement against the full cache, on held-out essays. Each policy is "
        f"resolved for the model first: 'default' runs as {FALLBACK_POLICY} on a model it "
        "was not calibrated for (the row shows both names), and a policy that does not fit "
        "the model becomes an error row.",
        epilog=EVAL_EXIT_STATUS,
    )
    evaluate.add_argument("--model", default="smollm2", help=model_help)
    evaluate.add_argument(
        "--policy",
        action="append",
        required=True,
        help="a preset name, a policy JSON file, or 'all' (every preset); repeat to compare "
        f"several against one shared baseline (required; presets: {', '.join(PRESETS)})",
    )
    evaluate.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the rows here: one object for one --policy, a list for several, error "
        "rows included (default: not written)",
    )
    evaluate.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="write a PNG of compression ratio against perplexity increase, one point per "
        "policy that ran (needs matplotlib; default: not written)",
    )
    _add_settings(evaluate, EvalSettings)
    _add_progress(evaluate)
    evaluate.set_defaults(handler=run_eval)

    cal = commands.add_parser(
        "calibrate",
        help="build a policy within an accuracy budget",
        description="Measure candidate quantizations, merges and per-layer bit widths on "
        "calibration text and write the policy with the highest compression ratio within "
        "the perplexity budget. The policy records the model's shape (calibrated_for) and "
        "is refused for models of any other shape.",
    )
    cal.add_argument("--model", default="smollm2", help=model_help)
    cal.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="PATH",
        help="where to write the policy JSON (required)",
    )
    cal.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        help="write every measurement and the search path here as JSON (default: not written)",
    )
    cal.add_argument(
        "--name", default="calibrated", help="name of the written policy (default: %(default)s)"
    )
    cal.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="write a PNG of the quantization candidates and the greedy search "
        "(needs matplotlib; default: not written)",
    )
    cal.add_argument(
        "--merge-kinds",
        default=",".join(MERGE_KINDS),
        help="which sides candidate merges merge: keys, values or keys,values "
        "(default: %(default)s)",
    )
    cal.add_argument(
        "--quantization-only",
        action="store_true",
        help="only pick the best quantization candidate within the budget (minutes); "
        "without it, per-pair merges and per-layer bit widths are searched too (about an "
        "hour on two CPU cores for the bundled model; default: off)",
    )
    _add_settings(cal, CalibrationSettings, CALIBRATION_FLAGS)
    _add_progress(cal)
    cal.set_defaults(handler=run_calibrate)

    transform = commands.add_parser(
        "calibrate-transform",
        help="fit the cross-layer transform codec for a model and choose its settings",
        description="Fit the transform codec's bases on search essays, then search group "
        "size, quantization steps and the exact window greedily: each change is scored by "
        "its KL divergence from the full cache on the search essays, and kept only if it "
        "also stays within the budget on validation essays (both disjoint from the "
        "evaluation essays). Writes the artifact (named by its SHA-256) into "
        "--artifact-dir and a policy naming it; a server needs the artifact in its "
        "MINICACHE_ARTIFACT_DIR to use the policy.",
    )
    transform.add_argument("--model", default="smollm2", help=model_help)
    transform.add_argument(
        "--out", type=Path, required=True, metavar="PATH", help="the policy JSON (required)"
    )
    transform.add_argument(
        "--artifact-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory the artifact <sha256>.mcta is written to (required)",
    )
    transform.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        help="every trial and the chosen point as JSON (default: not written)",
    )
    transform.add_argument(
        "--name", default="calibrated", help="name of the written policy (default: %(default)s)"
    )
    transform.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="PNG of every trial's ratio against perplexity increase (needs matplotlib; "
        "default: not written)",
    )
    _add_settings(transform, TransformSettings, TRANSFORM_FLAGS)
    _add_progress(transform)
    transform.set_defaults(handler=run_calibrate_transform)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minicache_worker.models import UnsupportedModelError

    try:
        return args.handler(args)
    except (UnsupportedModelError, ValueError, OSError) as exc:
        print(f"minicache-worker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
