"""The load generator (deploy/loadtest/load_test.py) against a real cache server with a
real Redis overflow tier: a few seconds of load, its JSON report and plots, and the
check of every prefetch's tensors, which must catch a wrong one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from service_fixtures import ServerThread, free_port, settings_for

from minicache_client import CacheClient, ClientConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "loadtest"))
import load_test

pytestmark = pytest.mark.redis

LAYERS, HEADS, DIM = 4, 2, 16
MAX_CONTEXT = 512
# A dozen kivi4 sequences (one of 512 tokens takes about 80 KB) and room to stage
# the puts in progress: sequences are kept (--keep), so the device tier overflows to
# Redis during the run.
DEVICE_BUDGET = 1 << 20
PLOTS = ("throughput", "latency", "hit_rate", "tier_bytes", "errors", "server_memory")


@pytest.fixture
def overflowing_server(redis_process):
    metrics_port = free_port()
    server = ServerThread(
        settings_for(
            device_budget_bytes=DEVICE_BUDGET,
            redis_url=redis_process.url,
            redis_timeout_s=2.0,
            metrics_listen=f"127.0.0.1:{metrics_port}",
        )
    )
    try:
        yield server, f"127.0.0.1:{metrics_port}"
    finally:
        server.stop()


def load_args(server_address: str, metrics: str, *extra: str) -> list[str]:
    return [
        "--targets",
        server_address,
        "--metrics",
        metrics,
        "--insecure",
        "--policy",
        "kivi4",  # lossy: the expectation goes through the SDK's encoder
        "--layers",
        str(LAYERS),
        "--kv-heads",
        str(HEADS),
        "--head-dim",
        str(DIM),
        "--max-context-tokens",
        str(MAX_CONTEXT),
        "--conversations",
        "40",
        "--append-tokens",
        "4",
        "--appends-per-turn",
        "2",
        "--concurrency",
        "3",
        "--sample-interval-s",
        "0.5",
        "--bucket-s",
        "1",
        "--keep",
        "--no-progress",
        *extra,
    ]


def test_report_counts_operations_tiers_and_writes_plots(overflowing_server, tmp_path) -> None:
    server, metrics = overflowing_server
    report_path = tmp_path / "report.json"
    plots = tmp_path / "plots"
    status = load_test.main(
        load_args(
            server.address,
            metrics,
            "--duration-s",
            "6",
            "--json",
            str(report_path),
            "--plots",
            str(plots),
        )
    )
    report = json.loads(report_path.read_text())
    assert status == 0, report["errors"]
    assert report["mode"] == "cache"
    assert report["config"]["policy"] == "kivi4" and "token" not in report["config"]
    operations = report["operations"]
    assert set(operations) == {"lookup", "put", "append", "prefetch", "delete"}
    assert operations["put"]["ok"] > 0 and operations["prefetch"]["ok"] > 0
    for row in operations.values():
        assert row["requests"] == row["ok"] + row["misses"] + row["errors"]
        if row["ok"]:
            latency = row["latency_ms"]
            assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    assert report["errors"] == [] and report["errors_by_code"] == {}
    # Every prefetch was checked against the SDK's own restore, and none was wrong.
    assert report["checked_prefetches"] == operations["prefetch"]["ok"]
    assert report["wrong_tensors"] == 0
    hit_rate = report["hit_rate"]
    assert hit_rate["prefetches"] >= operations["prefetch"]["ok"]
    assert sum(hit_rate[tier] for tier in ("device", "overflow", "miss")) == pytest.approx(1)
    # Throughput over time adds up to the counts.
    timeline = report["timeline"]
    assert sum(timeline["counts"]["put"]) == operations["put"]["ok"]
    assert sum(timeline["counts"]["turns"]) == report["turns"] > 0
    # The server was scraped: resident memory and bytes by tier, Redis among them.
    series = report["servers"][server.address]
    assert len(series["t"]) >= 3 and series["scrape_errors"] == 0
    assert all(value > 0 for value in series["rss_bytes"])
    assert {"host", "redis"} <= set(series["tier_bytes"])
    assert len(series["staging_bytes"]) == len(series["t"])  # the staging gauge
    assert series["staging_bytes"][-1] == 0  # scraped after the last put ended
    assert max(series["tier_bytes"]["redis"]) > 0  # the small budget overflowed
    assert sum(report["server_hits"]["by_tier"].values()) > 0
    assert sum(report["server_hit_rate"].values()) == pytest.approx(1)
    assert "change_pct" in report["memory"][server.address]
    for name in PLOTS:
        path = plots / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
    # The memory figures and plots again from the JSON report alone.
    again = tmp_path / "again"
    assert load_test.main(["--replot", str(report_path), "--plots", str(again)]) == 0
    assert sorted(path.name for path in again.iterdir()) == sorted(f"{n}.png" for n in PLOTS)


def test_a_wrong_expectation_is_reported_as_wrong_tensors(overflowing_server, tmp_path) -> None:
    server, metrics = overflowing_server
    args = load_test.parse_args(
        load_args(server.address, metrics, "--duration-s", "4", "--max-sequences", "12")
    )
    # Expectations of other KV than the run puts (another seed): a corrupted expectation.
    other = load_test.RandomKV(LAYERS, HEADS, DIM, MAX_CONTEXT, "float16", seed=99)
    report = load_test.run(args, expected=load_test.ExpectedKV(other))
    assert report["checked_prefetches"] > 0
    assert report["wrong_tensors"] == report["checked_prefetches"]
    assert report["compared_elementwise"] == report["checked_prefetches"]
    assert "outside the tolerance" in report["wrong_tensor_examples"][0]


def test_check_accepts_the_servers_restore_and_refuses_one_changed_value(
    overflowing_server,
) -> None:
    server, _ = overflowing_server
    kv = load_test.RandomKV(LAYERS, HEADS, DIM, MAX_CONTEXT, "float16", seed=3)
    expected = load_test.ExpectedKV(kv)
    writes = [load_test.Write(0, 100, True), load_test.Write(100, 104, False)]
    with CacheClient(ClientConfig(server.address, insecure=True, timeout_s=30)) as client:
        for write in writes:
            client.put(
                "m",
                "checked",
                kv.span(7, write.start, write.end),
                dtype="float16",
                start_token=write.start,
                policy="kivi4" if write.start == 0 else "",
                seal=write.seal,
            )
        policy = client.lookup("m", "checked").policy
        received = client.prefetch_layers("m", "checked")
    assert expected.check(7, policy, writes, received)[0] is None
    # A mirror that encoded the first write goes on from there, to the same result.
    mirror = load_test.SequenceMirror()
    load_test.ExpectedKV(kv).restore(7, policy, writes[:1], mirror)
    assert load_test.ExpectedKV(kv).check(7, policy, writes, received, mirror) == (None, False)
    assert expected.check(8, policy, writes, received)[0] is not None  # another source
    assert expected.check(7, policy, writes[:1], received)[0] is not None  # other history
    changed = [(np.array(keys), values) for keys, values in received]
    changed[2][0][1, 50, 3] += np.float16(0.5)
    mismatch, elementwise = expected.check(7, policy, writes, changed)
    assert elementwise and mismatch is not None and mismatch.layer == 2
    assert "1 of" in mismatch.detail


def test_memory_drift_tells_load_swings_from_growth() -> None:
    import report

    t = np.arange(0.0, 600.0, 5.0)
    swinging = 400e6 + 80e6 * np.sin(2 * np.pi * t / 20.0)  # requests in flight come and go
    growing = 400e6 + 0.5e6 * t  # +300 MB over the run
    drift = report.memory_drift(
        {"flat": {"t": t, "rss_bytes": swinging}, "leak": {"t": t, "rss_bytes": growing}},
        warmup_s=120.0,
    )
    flat, leak = drift["flat"], drift["leak"]
    assert len(flat["window_means_mib"]) == len(leak["window_means_mib"]) == 7  # whole windows
    assert flat["window_starts_s"] == [120.0 + 60.0 * index for index in range(7)]
    x, y = report.window_steps(flat)
    assert x[:2] == [120.0, 180.0] and x[3:5] == [180.0, 240.0] and np.isnan(x[2])
    assert y[0] == y[1] == flat["window_means_mib"][0]
    assert flat["range_pct"] > 30  # single samples swing ...
    assert flat["window_drift_pct"] < 5 and abs(flat["trend_pct"]) < 5  # ... around a flat mean
    assert leak["window_drift_pct"] > 30 and leak["trend_pct"] > 30
