"""Prometheus metrics of both services, served as text on an HTTP port.

A small registry (counters, gauges, histograms with labels) rendered in the Prometheus
text exposition format, version 0.0.4, on `GET /metrics`. A service declares its
metrics as attributes of a `MetricSet` subclass (`CacheMetrics`, `WorkerMetrics`);
`serve_metrics` serves one. Updates and scrapes may come from different threads: each
metric holds a lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    """One metric family: a name, its help text and label names; subclasses hold the
    samples."""

    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            lines.extend(self._samples())
        return lines

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0)

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, key)} {_number(value)}"
            for key, value in sorted(self.values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = value


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, *args, buckets: Sequence[float] = LATENCY_BUCKETS_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buckets = (*sorted(buckets), math.inf)
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self.series.setdefault(key, ([0] * len(self.buckets), [0.0]))
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[index] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        series = self.series.get(self._key(labels))
        return series[0][-1] if series else 0

    def _samples(self) -> list[str]:
        lines = []
        for key, (counts, total) in sorted(self.series.items()):
            for bound, count in zip(self.buckets, counts, strict=True):
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {count}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {counts[-1]}")
        return lines


class MetricSet:
    """A service's metrics: every `Metric` attribute, rendered in the order the
    subclass's `__init__` assigns them."""

    @property
    def all(self) -> list[Metric]:
        return [value for value in vars(self).values() if isinstance(value, Metric)]

    def render(self) -> str:
        return "\n".join(line for metric in self.all for line in metric.render()) + "\n"


def serve_metrics(metrics: MetricSet, host: str, port: int) -> ThreadingHTTPServer:
    """Start `GET /metrics` in a daemon thread; returns the server (`.server_port`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass  # scrapes are not worth a log line each

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
