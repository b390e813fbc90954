"""The cache server's Prometheus endpoint, scraped over HTTP on loopback and parsed with
prometheus-client's own parser: every metric is there, counters move with real requests,
the scrape-time totals equal what Stats reports, each server counts only its own
requests, and stopping the server closes the port."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import ServerThread, kv_layers, settings_for

from minicache_client import CacheClient, ClientConfig, NotFoundError

LAYERS, TOKENS, HEADS, DIM = 6, 128, 2, 16
SEQUENCE_BYTES = LAYERS * 2 * HEADS * TOKENS * DIM * 2  # policy none, float16: 98,304

COUNTERS = (
    "minicache_requests",
    "minicache_hits",
    "minicache_misses",
    "minicache_evictions",
    "minicache_promotions",
    "minicache_corrupt_entries",
)
GAUGES = (
    "minicache_tier_bytes",
    "minicache_device_budget_bytes",
    "minicache_staging_bytes",
    "minicache_staging_waiting",
    "minicache_fp16_bytes",
    "minicache_compression_ratio",
    "minicache_sequences",
)


class Scrape:
    """One GET /metrics, parsed: metric families by name and samples by name and labels."""

    def __init__(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            self.content_type = response.headers["Content-Type"]
            text = response.read().decode()
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in self.families.values()
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when the series does not exist yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metered(make_server):
    server = make_server(metrics_listen="127.0.0.1:0")
    with CacheClient(ClientConfig(target=server.address, insecure=True, timeout_s=10)) as client:
        yield server, client


def test_every_metric_is_exposed_in_the_text_format(metered) -> None:
    server, _ = metered
    scrape = Scrape(server.server.metrics_port)
    assert scrape.content_type.startswith("text/plain; version=0.0.4")
    for name in COUNTERS:
        assert scrape.families[name].type == "counter"
    assert scrape.families["minicache_request_seconds"].type == "histogram"
    for name in GAUGES:
        assert scrape.families[name].type == "gauge"
    assert "minicache_overflow_available" not in scrape.families  # no Redis configured
    assert scrape.value("process_resident_memory_bytes") > 0
    assert scrape.value("minicache_device_budget_bytes") == server.store.device.budget_bytes


def test_requests_move_the_counters_and_totals_match_stats(metered) -> None:
    server, client = metered
    before = Scrape(server.server.metrics_port)
    put = client.put("m", "s", kv_layers(LAYERS, TOKENS, HEADS, DIM), dtype="float16")
    held = client.lookup("m", "s")
    client.prefetch_layers("m", "s")
    with pytest.raises(NotFoundError):
        client.lookup("m", "never-written")
    stats = client.stats()
    after = Scrape(server.server.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("minicache_requests_total", method="Put", code="OK") == 1
    assert moved("minicache_requests_total", method="Prefetch", code="OK") == 1
    assert moved("minicache_requests_total", method="Lookup", code="OK") == 1
    assert moved("minicache_requests_total", method="Lookup", code="NOT_FOUND") == 1
    assert moved("minicache_misses_total", reason="unknown_sequence") == 1
    assert moved("minicache_request_seconds_count", method="Put") == 1
    assert moved("minicache_request_seconds_bucket", method="Put", le="+Inf") == 1
    assert after.value("minicache_request_seconds_sum", method="Put") > 0
    assert moved("minicache_hits_total", tier=server.store.device.name) == held.device_groups

    # The totals are read from the store at scrape time and agree with Stats.
    assert stats.sequences == 1 and stats.overflow_bytes == 0
    assert after.value("minicache_sequences") == stats.sequences
    assert after.value("minicache_tier_bytes", tier=server.store.device.name) == (
        stats.device_bytes
    )
    assert after.value("minicache_tier_bytes", tier="redis") == stats.overflow_bytes
    assert after.value("minicache_fp16_bytes") == stats.fp16_bytes == put.fp16_bytes
    assert math.isclose(after.value("minicache_compression_ratio"), stats.compression_ratio)
    assert after.value("minicache_device_budget_bytes") == stats.device_budget_bytes
    # The put ended: its staging was given back, and no put waits for any.
    assert after.value("minicache_staging_bytes") == server.store.staged_bytes == 0
    assert after.value("minicache_staging_waiting") == 0

    assert client.delete("m", "s")
    emptied = Scrape(server.server.metrics_port)
    assert emptied.value("minicache_sequences") == 0
    assert emptied.value("minicache_tier_bytes", tier=server.store.device.name) == 0
    assert emptied.value("minicache_compression_ratio") == 0


def test_overflow_tier_bytes_and_evictions_are_scraped(make_server, redis_process) -> None:
    server = make_server(
        metrics_listen="127.0.0.1:0",
        device_budget_bytes=2 * SEQUENCE_BYTES + SEQUENCE_BYTES // 2,
        redis_url=redis_process.url,
    )
    with CacheClient(ClientConfig(target=server.address, insecure=True, timeout_s=10)) as client:
        for index in range(4):
            layers = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=index)
            client.put("m", f"s{index}", layers, dtype="float16", policy="none")
        stats = client.stats()
    scrape = Scrape(server.server.metrics_port)
    assert stats.overflow_bytes > 0  # the budget really was exceeded
    assert scrape.value("minicache_overflow_available") == 1
    assert scrape.value("minicache_tier_bytes", tier="redis") == stats.overflow_bytes
    assert scrape.value("minicache_tier_bytes", tier=server.store.device.name) == (
        stats.device_bytes
    )
    assert scrape.value("minicache_evictions_total") > 0
    assert scrape.value("minicache_sequences") == 4


def test_each_server_counts_only_its_own_requests(make_server) -> None:
    first = make_server(metrics_listen="127.0.0.1:0")
    second = make_server(metrics_listen="127.0.0.1:0")
    with CacheClient(ClientConfig(target=first.address, insecure=True, timeout_s=10)) as client:
        client.stats()
        client.stats()
    stats_ok = {"method": "Stats", "code": "OK"}
    assert Scrape(first.server.metrics_port).value("minicache_requests_total", **stats_ok) == 2
    assert Scrape(second.server.metrics_port).value("minicache_requests_total", **stats_ok) == 0


def test_stopping_the_server_closes_the_metrics_port() -> None:
    server = ServerThread(settings_for(metrics_listen="127.0.0.1:0"))
    try:
        port = server.server.metrics_port
        assert Scrape(port).value("minicache_sequences") == 0
    finally:
        server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass
