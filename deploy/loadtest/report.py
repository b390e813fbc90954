"""The load test's report: server samples while it runs, the JSON summary, the plots.

Shared by `load_test.py` and the capacity runs, which import it from this directory
(`sys.path` holds the script's own directory when it runs as a script).

- `ServerSampler` scrapes each server's Prometheus endpoint every few seconds on a
  thread of its own (prometheus-client's text parser): resident memory
  (`process_resident_memory_bytes`), stored bytes by tier (`minicache_tier_bytes`),
  entries served by tier (`minicache_hits_total`), misses by reason
  (`minicache_misses_total`). Each sample is one point of a per-server time series.
- `latency_summary`, `timeline`, `memory_drift`: the figures the report is made of.
- `write_plots`: one PNG per figure, drawn from the JSON report alone (matplotlib's Agg
  backend, no display), so a report written earlier can be plotted again.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# Families read from each server and the label that splits each of them (None: one value).
SCRAPED_FAMILIES: dict[str, str | None] = {
    "process_resident_memory_bytes": None,
    "minicache_tier_bytes": "tier",
    "minicache_staging_bytes": None,
    "minicache_hits": "tier",
    "minicache_misses": "reason",
}
SERIES_NAMES = {
    "process_resident_memory_bytes": "rss_bytes",
    "minicache_tier_bytes": "tier_bytes",
    "minicache_staging_bytes": "staging_bytes",
    "minicache_hits": "hits",
    "minicache_misses": "misses",
}
SCRAPE_TIMEOUT_S = 5.0
PERCENTILES = (50, 95, 99)


# ---- scraping ----

# Resident memory is compared window to window, each the mean of this many seconds of
# samples (`memory_drift`).
MEMORY_WINDOW_S = 60.0


def scrape(address: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> dict[str, Any]:
    """One GET of `http://<address>/metrics`: for each family of `SCRAPED_FAMILIES`, its
    value, or its values by label. Counters are read from their `_total` sample."""
    url = address if address.startswith("http") else f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    values: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in SCRAPED_FAMILIES:
            continue
        label = SCRAPED_FAMILIES[family.name]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if label is None:
                values[family.name] = sample.value
            else:
                values.setdefault(family.name, {})[sample.labels.get(label, "")] = sample.value
    return values


class ServerSampler:
    """Scrapes every metrics endpoint each `interval_s` seconds until `stop()`.

    `endpoints`: server name -> metrics address (host:port). `series()` returns, per
    server, `{"t": [...], "rss_bytes": [...], "tier_bytes": {tier: [...]}, "hits":
    {tier: [...]}, "misses": {reason: [...]}, "scrape_errors": n}`; `t` is seconds since
    `started` (time.monotonic()). A value missing from a scrape is None in its series.
    """

    def __init__(
        self, endpoints: Mapping[str, str], interval_s: float, started: float | None = None
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.endpoints = dict(endpoints)
        self.interval_s = interval_s
        self.started = time.monotonic() if started is None else started
        self._samples: dict[str, list[tuple[float, dict[str, Any]]]] = {
            name: [] for name in self.endpoints
        }
        self._errors: dict[str, int] = dict.fromkeys(self.endpoints, 0)
        self._last_error: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-sampler", daemon=True)

    def start(self) -> ServerSampler:
        if self.endpoints:
            self._thread.start()
        return self

    def stop(self) -> None:
        """One last sample, then the thread ends (within one scrape's timeout)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=SCRAPE_TIMEOUT_S * (len(self.endpoints) + 1))

    def sample_once(self) -> None:
        for name, address in self.endpoints.items():
            try:
                values = scrape(address)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self._errors[name] += 1
                self._last_error[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            self._samples[name].append((time.monotonic() - self.started, values))

    def _run(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                self.sample_once()
                return

    def series(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for name, samples in self._samples.items():
            server: dict[str, Any] = {
                "metrics": self.endpoints[name],
                "t": [round(t, 3) for t, _ in samples],
                "scrape_errors": self._errors[name],
            }
            if name in self._last_error:
                server["last_scrape_error"] = self._last_error[name]
            for family, label in SCRAPED_FAMILIES.items():
                key = SERIES_NAMES[family]
                if label is None:
                    server[key] = [values.get(family) for _, values in samples]
                    continue
                labels = sorted({item for _, values in samples for item in values.get(family, {})})
                server[key] = {
                    item: [values.get(family, {}).get(item) for _, values in samples]
                    for item in labels
                }
            result[name] = server
        return result


# ---- figures ----


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99, mean and max in milliseconds (None without any call)."""
    if not len(seconds):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, PERCENTILES)
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


def timeline(
    events: Mapping[str, Sequence[float]], elapsed_s: float, bucket_s: float
) -> dict[str, Any]:
    """Completions per bucket of `bucket_s` seconds (the last one ends with the run,
    `width_s` says how long each is): `events` maps a name (an operation, "turns") to
    the times (seconds since the start) at which one completed."""
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be > 0, got {bucket_s}")
    count = max(1, math.ceil(elapsed_s / bucket_s))
    edges = np.minimum(np.arange(count + 1, dtype=np.float64) * bucket_s, max(elapsed_s, 1e-9))
    edges[-1] = max(elapsed_s, edges[-2] + 1e-9)
    return {
        "bucket_s": bucket_s,
        "start_s": edges[:-1].tolist(),
        "width_s": np.diff(edges).tolist(),
        "counts": {
            name: np.histogram(np.clip(np.asarray(times, dtype=np.float64), 0, edges[-1]), edges)[
                0
            ].tolist()
            for name, times in events.items()
        },
    }


def memory_drift(
    series: Mapping[str, Mapping[str, Any]],
    warmup_s: float,
    until_s: float = math.inf,
    window_s: float = MEMORY_WINDOW_S,
) -> dict[str, Any]:
    """Per server, resident memory from `warmup_s` to `until_s` (the end of the offered
    load, before the conversations in flight wind down), in MiB and %:

    - samples: the first and last, min and max, `change_pct` (last against first) and
      `range_pct` ((max - min) / first). A sample includes the buffers of the requests
      in flight at that moment, so these swing with the load;
    - `window_means_mib`: the mean of each whole `window_s` window of the span
      (starting at `window_starts_s`; a window without a sample is left out), and
      `window_drift_pct`: (largest - smallest window mean) / first window mean. "Flat
      within 5 %" is `window_drift_pct` at most 5: what the server holds does not grow
      from one window to the next;
    - `trend_pct`: the least-squares line through the samples, its change over the span
      against the mean."""
    drift: dict[str, Any] = {}
    for name, server in series.items():
        t = np.asarray(server.get("t", []), dtype=np.float64)
        rss = np.asarray(server.get("rss_bytes", []), dtype=np.float64)
        keep = (t >= warmup_s) & (t <= until_s) & np.isfinite(rss)
        if keep.sum() < 2:
            drift[name] = {"warmup_s": warmup_s, "samples": int(keep.sum())}
            continue
        times, after = t[keep], rss[keep]
        first = float(after[0])
        # Windows tile the judged span: to `until_s` when the run had one (its last
        # sample lands just before it), else to the last sample.
        end = until_s if math.isfinite(until_s) else float(times[-1])
        edges = np.arange(warmup_s, end - window_s + 1e-9, window_s)
        windows = [(times >= edge) & (times < edge + window_s) for edge in edges]
        kept = [(edge, window) for edge, window in zip(edges, windows, strict=True) if window.any()]
        means = [float(after[window].mean()) / 2**20 for _, window in kept]
        slope = float(np.polyfit(times, after, 1)[0])
        drift[name] = {
            "warmup_s": warmup_s,
            "until_s": end,
            "samples": int(keep.sum()),
            "first_mib": first / 2**20,
            "last_mib": float(after[-1]) / 2**20,
            "min_mib": float(after.min()) / 2**20,
            "max_mib": float(after.max()) / 2**20,
            "change_pct": 100.0 * (float(after[-1]) - first) / first,
            "range_pct": 100.0 * (float(after.max()) - float(after.min())) / first,
            "window_s": window_s,
            "window_starts_s": [float(edge) for edge, _ in kept],
            "window_means_mib": means,
            "window_drift_pct": (
                100.0 * (max(means) - min(means)) / means[0] if len(means) >= 2 else None
            ),
            "trend_pct": 100.0 * slope * (times[-1] - times[0]) / float(after.mean()),
        }
    return drift


def counter_deltas(series: Mapping[str, Mapping[str, Any]], key: str) -> dict[str, float]:
    """Growth of a labelled counter series (`hits`, `misses`) over the run, summed over
    servers: last sample minus first, by label."""
    totals: dict[str, float] = {}
    for server in series.values():
        for label, values in (server.get(key) or {}).items():
            finite = [value for value in values if value is not None]
            if finite:
                totals[label] = totals.get(label, 0.0) + finite[-1] - finite[0]
    return totals


# ---- plots ----


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: Path,
    title: str,
    ylabel: str,
    lines: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str = "seconds since start",
    dpi: int = 100,
    stacked: bool = False,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """One PNG of named (x, y) lines (stacked areas when `stacked`); `styles`: extra
    matplotlib settings of some lines, by name."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    try:
        if stacked and lines:
            x = next(iter(lines.values()))[0]
            axes.stackplot(
                x, *[np.nan_to_num(y) for _, y in lines.values()], labels=list(lines), alpha=0.8
            )
        else:
            for label, (x, y) in lines.items():
                axes.plot(x, y, label=label, **{"linewidth": 1.2, **(styles or {}).get(label, {})})
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if lines:
            axes.legend(fontsize="small", loc="best")
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        figure.tight_layout()
        figure.savefig(path, dpi=dpi)
    finally:
        plt.close(figure)
    return path


def bar_plot(
    path: Path,
    title: str,
    ylabel: str,
    groups: Mapping[str, Mapping[str, float]],
    *,
    dpi: int = 100,
    log: bool = False,
) -> Path:
    """One PNG of grouped bars: `groups` maps a group (x tick) to {series: height}."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    try:
        names = list(groups)
        series = sorted({label for bars in groups.values() for label in bars})
        width = 0.8 / max(1, len(series))
        for index, label in enumerate(series):
            heights = [groups[name].get(label, 0.0) or 0.0 for name in names]
            positions = np.arange(len(names)) + (index - (len(series) - 1) / 2) * width
            axes.bar(positions, heights, width, label=label)
        axes.set_xticks(np.arange(len(names)), names)
        axes.set_title(title)
        axes.set_ylabel(ylabel)
        if log:
            axes.set_yscale("log")
        axes.grid(alpha=0.3, axis="y")
        if series:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "none", ha="center", va="center", transform=axes.transAxes)
        figure.tight_layout()
        figure.savefig(path, dpi=dpi)
    finally:
        plt.close(figure)
    return path


def mebibytes(values: Sequence[float | None]) -> list[float]:
    """Bytes as MiB; a missing sample (None) as NaN, a gap in the line."""
    return [math.nan if value is None else value / 2**20 for value in values]


def window_steps(drift: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """A `memory_drift` entry's window means as horizontal steps (x, y), each window
    its own segment. Reports written before `window_starts_s` existed had no empty
    window: their windows follow each other from the warm-up."""
    width = drift["window_s"]
    means = drift["window_means_mib"]
    starts = drift.get("window_starts_s") or [
        drift["warmup_s"] + index * width for index in range(len(means))
    ]
    x: list[float] = []
    y: list[float] = []
    for start, mean in zip(starts, means, strict=True):
        x += [start, start + width, math.nan]
        y += [mean, mean, math.nan]
    return x, y


def _per_second(timeline_: Mapping[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """Rates at the middle of each bucket."""
    widths = timeline_["width_s"]
    middles = [start + width / 2 for start, width in zip(timeline_["start_s"], widths, strict=True)]
    return {
        name: (middles, [count / width for count, width in zip(counts, widths, strict=True)])
        for name, counts in timeline_["counts"].items()
        if any(counts)
    }


def write_plots(report: Mapping[str, Any], directory: str | Path, dpi: int = 100) -> list[Path]:
    """The report's figures as PNGs in `directory`: throughput over time, latency
    percentiles per operation, hit rate per tier, bytes per tier over time, errors by
    status code, server memory over time. Returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        line_plot(
            out / "throughput.png",
            "Completed operations and turns per second",
            "per second",
            _per_second(report["timeline"]),
            dpi=dpi,
        ),
        bar_plot(
            out / "latency.png",
            "Latency of successful calls",
            "milliseconds (log)",
            {
                name: {
                    f"p{p}": row["latency_ms"][f"p{p}_ms"]
                    for p in PERCENTILES
                    if row["latency_ms"][f"p{p}_ms"] is not None
                }
                for name, row in report["operations"].items()
                if row["ok"]
            },
            dpi=dpi,
            log=True,
        ),
        bar_plot(
            out / "hit_rate.png",
            f"Resumed turns by tier ({report['hit_rate'].get('prefetches') or 0:.0f} reads)",
            "share",
            {
                "client (lookup before prefetch)": {
                    tier: report["hit_rate"].get(tier) or 0.0
                    for tier in ("device", "overflow", "miss")
                },
                "server (entries served, /metrics)": report.get("server_hit_rate") or {},
            },
            dpi=dpi,
        ),
    ]
    servers = report.get("servers") or {}
    tier_lines = {}
    memory_lines = {}
    memory_styles: dict[str, dict[str, Any]] = {}
    for index, (name, server) in enumerate(servers.items()):
        for tier, values in (server.get("tier_bytes") or {}).items():
            tier_lines[f"{name} {tier}"] = (server["t"], mebibytes(values))
        if server.get("rss_bytes"):
            # Each server's samples thin and light, its window means bold, in one colour.
            memory_lines[name] = (server["t"], mebibytes(server["rss_bytes"]))
            memory_styles[name] = {"color": f"C{index}", "alpha": 0.45, "linewidth": 0.8}
            drift = (report.get("memory") or {}).get(name) or {}
            if drift.get("window_means_mib"):
                means = f"{name}, {drift['window_s']:.0f} s means"
                memory_lines[means] = window_steps(drift)
                memory_styles[means] = {"color": f"C{index}", "linewidth": 2.5}
    written.append(
        line_plot(out / "tier_bytes.png", "Stored bytes by tier", "MiB", tier_lines, dpi=dpi)
    )
    errors: dict[str, dict[str, float]] = {}
    for error in report.get("errors", []):
        errors.setdefault(error["code"], {})
        errors[error["code"]][error["operation"]] = (
            errors[error["code"]].get(error["operation"], 0) + error["count"]
        )
    if report.get("wrong_tensors"):
        errors.setdefault("WRONG_TENSOR", {})["prefetch"] = report["wrong_tensors"]
    written.append(bar_plot(out / "errors.png", "Errors by status code", "count", errors, dpi=dpi))
    written.append(
        line_plot(
            out / "server_memory.png",
            "Server resident memory",
            "MiB",
            memory_lines,
            dpi=dpi,
            styles=memory_styles,
        )
    )
    workers = report.get("workers")
    if workers and workers.get("ttft_ms"):
        written.append(
            bar_plot(
                out / "worker_ttft.png",
                "Worker time to first token by turn kind",
                "milliseconds",
                {
                    kind: {f"p{p}": row[f"p{p}_ms"] for p in PERCENTILES if row[f"p{p}_ms"]}
                    for kind, row in workers["ttft_ms"].items()
                    if row.get("turns")
                },
                dpi=dpi,
            )
        )
    return written
