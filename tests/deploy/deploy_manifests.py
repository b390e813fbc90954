"""The deploy checks' shared parts: where the deploy files and tools are, how a tool is
run, and an overlay as `kubectl kustomize` renders it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
OVERLAYS_DIR = KUBERNETES_DIR / "overlays"
GENERATE_CERTS = REPO / "deploy" / "certs" / "generate.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
# Every external command here finishes in seconds; the bound only stops a hung one.
COMMAND_TIMEOUT_S = 120


def overlay_names() -> list[str]:
    """Every folder under deploy/kubernetes/overlays with a kustomization."""
    return sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))


def venv_tool(name: str, venv: Path | None = None) -> Path:
    """The path of a tool that deploy/local/setup.sh installs into a virtual environment
    (default: the one running the tests); the test fails, naming setup.sh, without it."""
    path = (Path(sys.prefix) if venv is None else venv) / "bin" / name
    if not path.is_file():
        pytest.fail(
            f"{name} is not installed at {path}: run deploy/local/setup.sh, which installs "
            "the deploy checks' tools (CI runs it, so these tests are never skipped)"
        )
    return path


def run_tool(
    command: list[str | Path], ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, its output captured as text; an exit status outside
    `ok_codes` fails the test with the command's output."""
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode not in ok_codes:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class RenderedOverlay:
    """One overlay as `kubectl kustomize` renders it, with the credentials generated for
    it (`certs`: the folder generate.sh wrote for the overlay's namespace)."""

    name: str
    namespace: str
    manifest: Path
    certs: Path
    documents: list[dict[str, Any]] = field(default_factory=list)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.documents if doc["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        """The object of this kind and name; a ConfigMap or Secret also by the name its
        generator was given (before kustomize's hash suffix)."""
        found = [
            doc
            for doc in self.objects(kind)
            if doc["metadata"]["name"] == name
            or (
                kind in ("ConfigMap", "Secret")
                and doc["metadata"]["name"].rpartition("-")[0] == name
            )
        ]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} objects named {name}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        """Every object that runs pods."""
        return [
            doc
            for doc in self.documents
            if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
        ]


def certificate_matches(certificate: Path, host: str) -> bool:
    """Whether OpenSSL's own host name check accepts `host` for the certificate (its
    SANs, wildcards included)."""
    output = run_tool(["openssl", "x509", "-in", certificate, "-noout", "-checkhost", host])
    return "does match certificate" in output.stdout
