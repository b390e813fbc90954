"""The Kubernetes overlays, rendered by kustomize, checked offline: strict schema
validation, the checkov policy scan (zero findings but the documented skips in
policy_skips.yaml), the hardening every pod must have, the network paths the
NetworkPolicies leave open, the workers' cache-server list against the StatefulSet, and
the certificates against the names the workers dial.
"""

from __future__ import annotations

import copy
import importlib
import json
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_manifests import (
    REPO,
    RenderedOverlay,
    certificate_matches,
    overlay_names,
    run_tool,
    venv_tool,
)

OVERLAYS = overlay_names()
# The oldest Kubernetes these files support (native gRPC probes are GA since 1.27; 1.30
# is the oldest release still maintained when they were written) and the newest that
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
POLICY_SKIPS = REPO / "tests" / "deploy" / "policy_skips.yaml"
COMPONENTS = ("cache-server", "worker", "redis")
RETIRED_WORKER_SETTING = "MINICACHE_WORKER_CACHE_TARGET"
GPU_RESOURCE = "nvidia.com/gpu"


def tool_module(name: str) -> ModuleType:
    """A Python tool's module; the test fails, naming setup.sh, when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(
            f"{name} is not installed: run deploy/local/setup.sh, which installs the deploy "
            "checks' tools (CI runs it, so these tests are never skipped)"
        )


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def component_workload(overlay: RenderedOverlay, component: str) -> dict[str, Any]:
    found = [
        w
        for w in overlay.workloads()
        if pod_labels(w).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{overlay.name}: {len(found)} workloads of component {component}"
    return found[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def config_of(overlay: RenderedOverlay, workload: dict[str, Any]) -> dict[str, str]:
    """The settings a workload's (single) container reads from its ConfigMaps."""
    data: dict[str, str] = {}
    for source in workload["spec"]["template"]["spec"]["containers"][0].get("envFrom", []):
        name = source["configMapRef"]["name"]
        data.update(overlay.one("ConfigMap", name)["data"])
    return data


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only, which is all these files use) against labels."""
    assert "matchExpressions" not in selector, "extend selects() for matchExpressions"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


# ---- strict schema validation ----


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_is_valid_against_the_strict_kubernetes_schema(
    rendered_overlays: dict[str, RenderedOverlay], name: str, version: str
) -> None:
    """Every rendered object matches its kind's schema with unknown fields forbidden."""
    validator = tool_module("kubernetes_validate")
    errors = []
    for doc in rendered_overlays[name].documents:
        try:
            validator.validate(doc, version, strict=True)
        except validator.ValidationError as error:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
    assert not errors, f"{name} against Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_rejects_an_unknown_field(
    rendered_overlays: dict[str, RenderedOverlay],
) -> None:
    """The validator is strict indeed: a misspelt field of a container is an error."""
    validator = tool_module("kubernetes_validate")
    statefulset = copy.deepcopy(rendered_overlays[OVERLAYS[0]].objects("StatefulSet")[0])
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(validator.ValidationError, match="readinesProbe"):
        validator.validate(statefulset, KUBERNETES_VERSIONS[-1], strict=True)


# ---- checkov policy scan ----


@pytest.fixture(scope="session")
def checkov_findings(rendered_overlays: dict[str, RenderedOverlay]) -> list[tuple[str, str]]:
    """checkov's failed checks over every rendered overlay, as (check id, "Kind/name")."""
    checkov = venv_tool("checkov", venv=REPO / ".venv" / "checkov")
    command = [checkov, "--framework", "kubernetes", "--skip-download", "--quiet", "-o", "json"]
    for overlay in rendered_overlays.values():
        command += ["--file", overlay.manifest]
    # checkov exits 1 when a check fails: the findings are judged below, not by its status.
    reports = json.loads(run_tool(command, ok_codes=(0, 1)).stdout)
    report = reports[0] if isinstance(reports, list) else reports
    summary = report["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert summary["resource_count"] > 0 and summary["passed"] > 0, summary
    findings = []
    for failed in report["results"]["failed_checks"]:
        kind, _namespace, name = failed["resource"].split(".", 2)
        findings.append((failed["check_id"], f"{kind}/{name}"))
    return findings


def load_policy_skips() -> dict[str, dict[str, Any]]:
    skips = yaml.safe_load(POLICY_SKIPS.read_text())
    for check_id, entry in skips.items():
        assert set(entry) == {"check", "reason", "objects"}, f"{check_id}: {sorted(entry)}"
        assert len(entry["reason"].split()) >= 10, f"{check_id}: give the reason in full"
        assert entry["objects"], f"{check_id}: name the objects it covers"
    return skips


def test_checkov_finds_nothing_but_the_documented_skips(
    checkov_findings: list[tuple[str, str]],
) -> None:
    skips = load_policy_skips()
    unexplained = sorted(
        {
            (check_id, obj)
            for check_id, obj in checkov_findings
            if obj not in skips.get(check_id, {}).get("objects", [])
        }
    )
    assert not unexplained, (
        "checkov findings: fix the manifests (or, with a reason, add them to "
        f"{POLICY_SKIPS.name}): {unexplained}"
    )


def test_every_documented_skip_still_fires(checkov_findings: list[tuple[str, str]]) -> None:
    """A skip whose finding is gone is stale: delete it, so that the check guards again."""
    found = set(checkov_findings)
    stale = sorted(
        (check_id, obj)
        for check_id, entry in load_policy_skips().items()
        for obj in entry["objects"]
        if (check_id, obj) not in found
    )
    assert not stale, f"skips in {POLICY_SKIPS.name} that checkov no longer reports: {stale}"


# ---- what every pod must have ----


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_has_probes_resources_and_a_locked_down_security_context(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    overlay = rendered_overlays[name]
    assert {pod_labels(w).get("app.kubernetes.io/component") for w in overlay.workloads()} == set(
        COMPONENTS
    )
    problems = []
    for workload in overlay.workloads():
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service-account token")
        for container in containers(workload):
            at = f"{where} container {container['name']}"
            security = container.get("securityContext", {})
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    problems.append(f"{at}: no {probe}")
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in container.get("resources", {}).get(section, {}):
                        problems.append(f"{at}: no {resource} in resources.{section}")
            if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
                problems.append(f"{at}: runAsNonRoot is not true")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem is not true")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if security.get("privileged"):
                problems.append(f"{at}: privileged")
            capabilities = security.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
                problems.append(f"{at}: capabilities are not dropped (drop ALL, add none)")
            seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccomp profile is not RuntimeDefault")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("component", ["cache-server", "worker"])
@pytest.mark.parametrize("name", OVERLAYS)
def test_cache_servers_and_workers_have_a_disruption_budget_that_lets_drains_proceed(
    rendered_overlays: dict[str, RenderedOverlay], name: str, component: str
) -> None:
    overlay = rendered_overlays[name]
    workload = component_workload(overlay, component)
    budgets = [
        pdb
        for pdb in overlay.objects("PodDisruptionBudget")
        if selects(pdb["spec"]["selector"], pod_labels(workload))
    ]
    assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets for {component}"
    spec = budgets[0]["spec"]
    replicas = workload["spec"]["replicas"]
    # A budget that allows no eviction at all would block every node drain.
    if "maxUnavailable" in spec:
        assert int(spec["maxUnavailable"]) >= 1
    else:
        assert int(spec["minAvailable"]) < replicas


# ---- network policies ----


def peer_matches(peer: dict[str, Any], labels: dict[str, str], same_namespace: bool) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" not in peer and not same_namespace:
        return False
    # namespaceSelector {} is every namespace: only the pod selector narrows it here.
    return selects(peer.get("podSelector", {}), labels)


def rules_admit(
    rules: list[dict[str, Any]],
    peer_key: str,
    labels: dict[str, str],
    same_namespace: bool,
    port: int,
    protocol: str,
) -> bool:
    for rule in rules:
        peers = rule.get(peer_key)
        if peers and not any(peer_matches(peer, labels, same_namespace) for peer in peers):
            continue
        ports = rule.get("ports")
        if ports and not any(
            p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
        ):
            continue
        return True
    return False


def policies_of(overlay: RenderedOverlay, labels: dict[str, str], policy_type: str) -> list:
    return [
        policy
        for policy in overlay.objects("NetworkPolicy")
        if policy_type in policy["spec"].get("policyTypes", [])
        and selects(policy["spec"]["podSelector"], labels)
    ]


def egress_allowed(overlay, source, destination, same_namespace, port, protocol) -> bool:
    policies = policies_of(overlay, source, "Egress")
    return not policies or any(
        rules_admit(p["spec"].get("egress", []), "to", destination, same_namespace, port, protocol)
        for p in policies
    )


def ingress_allowed(overlay, source, destination, same_namespace, port, protocol) -> bool:
    policies = policies_of(overlay, destination, "Ingress")
    return not policies or any(
        rules_admit(p["spec"].get("ingress", []), "from", source, same_namespace, port, protocol)
        for p in policies
    )


def labels_of(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "minicache", "app.kubernetes.io/component": component}


DNS = {"k8s-app": "kube-dns"}  # kube-system's DNS pods, another namespace
UNLABELLED: dict[str, str] = {}  # any other pod of the namespace

# (source, destination, destination in the same namespace, port, protocol, allowed)
NETWORK_PATHS = [
    (labels_of("worker"), labels_of("cache-server"), True, 50051, "TCP", True),
    (labels_of("cache-server"), labels_of("redis"), True, 6379, "TCP", True),
    (labels_of("cache-server"), DNS, False, 53, "UDP", True),
    (labels_of("worker"), DNS, False, 53, "UDP", True),
    (labels_of("worker"), labels_of("redis"), True, 6379, "TCP", False),
    (labels_of("cache-server"), labels_of("worker"), True, 50061, "TCP", False),
    (labels_of("redis"), labels_of("cache-server"), True, 50051, "TCP", False),
    (labels_of("redis"), DNS, False, 53, "UDP", False),
    (UNLABELLED, labels_of("cache-server"), True, 50051, "TCP", False),
    (UNLABELLED, labels_of("redis"), True, 6379, "TCP", False),
]


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_deny_by_default(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    default_deny = [
        p
        for p in rendered_overlays[name].objects("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(default_deny) == 1, f"{name}: no default-deny NetworkPolicy"


@pytest.mark.parametrize(
    ("source", "destination", "same_namespace", "port", "protocol", "allowed"),
    NETWORK_PATHS,
    ids=[
        f"{s.get('app.kubernetes.io/component', s.get('k8s-app', 'other-pod'))}->"
        f"{d.get('app.kubernetes.io/component', d.get('k8s-app'))}:{port}"
        for s, d, _, port, _, _ in NETWORK_PATHS
    ],
)
@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_open_exactly_the_paths_the_services_use(
    rendered_overlays: dict[str, RenderedOverlay],
    name: str,
    source: dict[str, str],
    destination: dict[str, str],
    same_namespace: bool,
    port: int,
    protocol: str,
    allowed: bool,
) -> None:
    overlay = rendered_overlays[name]
    egress = egress_allowed(overlay, source, destination, same_namespace, port, protocol)
    # Another namespace's ingress (DNS) is not ours to set.
    ingress = not same_namespace or ingress_allowed(
        overlay, source, destination, True, port, protocol
    )
    assert (egress and ingress) is allowed, f"egress {egress}, ingress {ingress}"


@pytest.mark.parametrize(
    ("component", "port"), [("cache-server", 50051), ("worker", 50061), ("redis", 6379)]
)
@pytest.mark.parametrize("name", OVERLAYS)
def test_clients_outside_the_namespace_reach_the_services_but_not_redis(
    rendered_overlays: dict[str, RenderedOverlay], name: str, component: str, port: int
) -> None:
    """Callers of the cache and worker services live elsewhere; Redis serves only the
    cache servers."""
    reachable = ingress_allowed(
        rendered_overlays[name], UNLABELLED, labels_of(component), False, port, "TCP"
    )
    assert reachable is (component != "redis")


# ---- the workers' cache servers ----


def assert_workers_list_every_cache_server(overlay: RenderedOverlay, domain: str) -> None:
    """MINICACHE_WORKER_CACHE_TARGETS names each replica of the StatefulSet once, by its
    name under the headless Service, followed by `domain`."""
    statefulset = component_workload(overlay, "cache-server")
    service = overlay.one("Service", statefulset["spec"]["serviceName"])
    assert service["spec"].get("clusterIP") == "None", "the cache servers' Service is headless"
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(statefulset))
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    expected = {
        f"{statefulset['metadata']['name']}-{i}.{service['metadata']['name']}{domain}:{port}"
        for i in range(statefulset["spec"]["replicas"])
    }
    targets = config_of(overlay, component_workload(overlay, "worker"))[
        "MINICACHE_WORKER_CACHE_TARGETS"
    ].split(",")
    assert len(targets) == len(set(targets)), f"a target listed twice: {targets}"
    assert set(targets) == expected


@pytest.mark.parametrize("name", OVERLAYS)
def test_workers_list_every_cache_server_by_its_stable_name(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    """Each overlay: the full names in its namespace, for its own replica count."""
    overlay = rendered_overlays[name]
    assert_workers_list_every_cache_server(overlay, f".{overlay.namespace}.svc.cluster.local")


def test_the_base_lists_its_own_cache_servers(rendered_base: RenderedOverlay) -> None:
    """The base, namespace-agnostic: the names relative to the pods' namespace."""
    assert_workers_list_every_cache_server(rendered_base, "")


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_retired_single_target_setting_is_gone(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    """A worker refuses to start while MINICACHE_WORKER_CACHE_TARGET is set."""
    assert RETIRED_WORKER_SETTING + ":" not in rendered_overlays[name].manifest.read_text()
    assert RETIRED_WORKER_SETTING + "=" not in rendered_overlays[name].manifest.read_text()


@pytest.mark.parametrize("name", OVERLAYS)
def test_certificates_cover_the_names_clients_dial(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    """generate.sh, run for the overlay's namespace, issues the cache servers' certificate
    for every target the workers dial, and Redis' for the URL the cache servers use."""
    overlay = rendered_overlays[name]
    targets = config_of(overlay, component_workload(overlay, "worker"))[
        "MINICACHE_WORKER_CACHE_TARGETS"
    ].split(",")
    for target in targets:
        host = target.rpartition(":")[0]
        assert certificate_matches(overlay.certs / "server.crt", host), host
    redis_url = config_of(overlay, component_workload(overlay, "cache-server"))[
        "MINICACHE_REDIS_URL"
    ]
    assert certificate_matches(overlay.certs / "redis.crt", urlsplit(redis_url).hostname)


@pytest.mark.parametrize("name", OVERLAYS)
def test_cache_servers_work_with_one_thread_per_cpu_of_their_limit(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    """MINICACHE_WORK_THREADS comes from the container's own CPU limit (the Downward
    API), so an overlay that changes the limit changes the threads with it."""
    statefulset = component_workload(rendered_overlays[name], "cache-server")
    server = next(
        c
        for c in statefulset["spec"]["template"]["spec"]["containers"]
        if c["name"] == "cache-server"
    )
    assert "cpu" in server["resources"]["limits"]
    threads = next(e for e in server["env"] if e["name"] == "MINICACHE_WORK_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"] == {
        "containerName": "cache-server",
        "resource": "limits.cpu",
        "divisor": "1",
    }


# ---- the GPU overlay ----


def gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU_RESOURCE, 0))


def test_the_gpu_overlay_gives_each_cache_server_a_gpu_on_a_gpu_node(
    rendered_overlays: dict[str, RenderedOverlay],
) -> None:
    assert "gpu" in rendered_overlays, "deploy/kubernetes/overlays/gpu is missing"
    overlay = rendered_overlays["gpu"]
    statefulset = component_workload(overlay, "cache-server")
    pod = statefulset["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "cache-server")
    assert gpu_limit(server) >= 1
    assert "cuda" in server["image"], "a CUDA build of the server image"
    assert any(key.startswith("nvidia.com/gpu") for key in pod.get("nodeSelector", {}))
    assert any(t.get("key") == GPU_RESOURCE for t in pod.get("tolerations", []))
    config = config_of(overlay, statefulset)
    assert config["MINICACHE_DEVICE"] == "cuda", "no silent fallback to host memory"
    # CuPy compiles kernels at first use: its cache must be on the writable /tmp.
    assert config["CUPY_CACHE_DIR"].startswith("/tmp/")


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_gpu_overlay_asks_for_gpus(
    rendered_overlays: dict[str, RenderedOverlay], name: str
) -> None:
    """The CPU images cannot use a GPU, and the workers run on CPU in every overlay."""
    overlay = rendered_overlays[name]
    for workload in overlay.workloads():
        for container in containers(workload):
            wants_gpu = name == "gpu" and container["name"] == "cache-server"
            assert (gpu_limit(container) >= 1) is wants_gpu, (workload["kind"], container["name"])
