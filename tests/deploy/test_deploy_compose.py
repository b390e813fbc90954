"""docker-compose.yml checked offline: against the Compose Specification's JSON schema
(the copy check-jsonschema ships, so no Docker daemon or compose plugin is needed), then
what the schema cannot say: every worker shards over every cache server, the services
are hardened and bounded, only loopback ports are published, and the certificates
generate.sh makes cover the names the services dial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_manifests import COMPOSE_FILE, GENERATE_CERTS, certificate_matches, run_tool, venv_tool

LONG_RUNNING_JOBS_EXEMPT = {"loadgen"}  # a bounded, one-shot load test, not a service


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services_named(compose: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if name.startswith(prefix)}


def listen_port(service: dict[str, Any], variable: str) -> str:
    return service["environment"][variable].rpartition(":")[2]


def worker_targets(worker: dict[str, Any]) -> list[str]:
    return worker["environment"]["MINICACHE_WORKER_CACHE_TARGETS"].split(",")


def test_compose_file_matches_the_compose_specification_schema() -> None:
    checker = venv_tool("check-jsonschema")
    result = run_tool([checker, "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE])
    assert "validation done" in result.stdout


def test_the_schema_check_rejects_a_misspelt_service_key(tmp_path: Path) -> None:
    """The schema is in force: an unknown key of a service is an error."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("    hostname: worker-a\n", "    hostnme: worker-a\n")
    )
    assert "hostnme" in broken.read_text()
    checker = venv_tool("check-jsonschema")
    result = run_tool([checker, "--builtin-schema", "vendor.compose-spec", broken], ok_codes=(1,))
    assert "hostnme" in result.stdout


def test_every_worker_lists_every_cache_server_and_waits_for_them(compose: dict[str, Any]) -> None:
    cache_servers = services_named(compose, "cache-server-")
    workers = services_named(compose, "worker-")
    assert len(cache_servers) == 3 and len(workers) == 2
    expected = {
        f"{name}:{listen_port(service, 'MINICACHE_LISTEN')}"
        for name, service in cache_servers.items()
    }
    for name, worker in workers.items():
        targets = worker_targets(worker)
        assert len(targets) == len(set(targets)), f"{name}: a target listed twice"
        assert set(targets) == expected, name
        assert "MINICACHE_WORKER_CACHE_TARGET" not in worker["environment"], name
        assert worker["depends_on"] == {
            server: {"condition": "service_healthy"} for server in cache_servers
        }, name
    # Sessions resume on any worker only when all spell the list the same.
    assert len({tuple(worker_targets(w)) for w in workers.values()}) == 1


def test_every_service_is_hardened_bounded_and_health_checked(compose: dict[str, Any]) -> None:
    problems = []
    for name, service in compose["services"].items():
        if service.get("read_only") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if service.get("cap_drop") != ["ALL"] or service.get("cap_add"):
            problems.append(f"{name}: capabilities are not all dropped")
        if "no-new-privileges:true" not in service.get("security_opt", []):
            problems.append(f"{name}: no no-new-privileges")
        if service.get("privileged"):
            problems.append(f"{name}: privileged")
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        if not {"cpus", "memory"} <= set(limits):
            problems.append(f"{name}: no CPU and memory limits")
        if name not in LONG_RUNNING_JOBS_EXEMPT and "test" not in service.get("healthcheck", {}):
            problems.append(f"{name}: no healthcheck")
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: {port} is published beyond loopback")
    assert not problems, "\n".join(problems)


def test_cache_servers_work_with_one_thread_per_cpu_of_their_limit(
    compose: dict[str, Any],
) -> None:
    # A container sees the host's CPUs: the server's default would be the host's count.
    servers = {n: s for n, s in compose["services"].items() if n.startswith("cache-server")}
    assert servers
    for name, service in servers.items():
        cpus = float(service["deploy"]["resources"]["limits"]["cpus"])
        assert int(service["environment"]["MINICACHE_WORK_THREADS"]) == math.ceil(cpus), name


def test_redis_is_reachable_from_the_cache_servers_only(compose: dict[str, Any]) -> None:
    backend = compose["networks"]["backend"]
    assert backend.get("internal") is True, "Redis' network has no route out"
    on_backend = {n for n, s in compose["services"].items() if "backend" in s.get("networks", [])}
    assert on_backend == {"redis", *services_named(compose, "cache-server-")}


def test_certificates_cover_the_names_the_services_dial(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """generate.sh's defaults (the compose case) issue the cache servers' certificate
    for every target the workers dial, the workers' for their service names, and Redis'
    for the host of the cache servers' Redis URL."""
    run_tool(["bash", GENERATE_CERTS, "--out", tmp_path])
    workers = services_named(compose, "worker-")
    for worker in workers.values():
        for target in worker_targets(worker):
            host = target.rpartition(":")[0]
            assert certificate_matches(tmp_path / "server.crt", host), host
    for name in workers:
        assert certificate_matches(tmp_path / "worker.crt", name), name
    redis_url = compose["services"]["cache-server-0"]["environment"]["MINICACHE_REDIS_URL"]
    redis_host = urlsplit(redis_url).hostname
    assert certificate_matches(tmp_path / "redis.crt", redis_host), redis_host
