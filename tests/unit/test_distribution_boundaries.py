"""The three distributions import each other only one way: the worker and the cache
server depend on the client, never on each other, and the client on neither (nor on
torch). No private name crosses a distribution boundary: shared code has a public home
(`minicache_client.serving` for the services' plumbing). Read from the source with
`ast`, so an import inside a function counts too."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Top-level package -> its folder (each is one distribution).
PACKAGES = {
    "minicache_client": ROOT / "client" / "minicache_client",
    "minicache_server": ROOT / "cache_server" / "minicache_server",
    "minicache_worker": ROOT / "inference_worker" / "minicache_worker",
}
# Package -> top-level modules none of its files may import, anywhere.
FORBIDDEN = {
    "minicache_client": {"minicache_server", "minicache_worker"},
    "minicache_worker": {"minicache_server"},
}
# Package -> top-level modules its files may import only inside a function: optional
# interop that the package works without (`minicache_client.tensors.to_torch` converts
# to torch tensors for a caller that has torch; the SDK itself never needs it).
FORBIDDEN_AT_IMPORT = {
    "minicache_client": {"torch"},
}
# pyproject folder -> distributions it must not depend on.
FORBIDDEN_DEPENDENCIES = {
    "client": {"minicache-server", "minicache-worker", "torch"},
    "inference_worker": {"minicache-server"},
}


class Import(NamedTuple):
    line: int
    module: str
    name: str | None  # the name of `from module import name`; None for `import module`
    in_function: bool


def imports_of(path: Path) -> list[Import]:
    """Every absolute import in the file, in the order of its lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_functions = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for inner in ast.walk(node)
    }
    found: list[Import] = []
    for node in ast.walk(tree):
        lazy = id(node) in in_functions
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name, None, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend(Import(node.lineno, node.module, alias.name, lazy) for alias in node.names)
    return sorted(found)


def sources(package: str) -> list[Path]:
    files = sorted(PACKAGES[package].rglob("*.py"))
    assert files, f"no sources under {PACKAGES[package]}"
    return files


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_no_forbidden_module(package: str) -> None:
    forbidden = FORBIDDEN[package]
    offending = [
        f"{where(path, found.line)} imports {found.module}"
        for path in sources(package)
        for found in imports_of(path)
        if found.module.split(".")[0] in forbidden
    ]
    assert not offending, (
        f"{package} must not import {sorted(forbidden)}; move what it needs to "
        "minicache_client (service plumbing: minicache_client.serving):\n" + "\n".join(offending)
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN_AT_IMPORT))
def test_package_imports_optional_modules_only_when_called(package: str) -> None:
    forbidden = FORBIDDEN_AT_IMPORT[package]
    offending = [
        f"{where(path, found.line)} imports {found.module} at import time"
        for path in sources(package)
        for found in imports_of(path)
        if found.module.split(".")[0] in forbidden and not found.in_function
    ]
    assert not offending, (
        f"{package} must import without {sorted(forbidden)}: import it inside the function "
        "that needs it:\n" + "\n".join(offending)
    )


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_private_name_crosses_a_distribution(package: str) -> None:
    offending = []
    for path in sources(package):
        for found in imports_of(path):
            top = found.module.split(".")[0]
            if top == package or top not in PACKAGES:
                continue
            parts = [*found.module.split("."), *([found.name] if found.name else [])]
            if any(part.startswith("_") for part in parts):
                shown = f"{found.module}.{found.name}" if found.name else found.module
                offending.append(f"{where(path, found.line)} imports {shown}")
    assert not offending, (
        f"{package} imports private names of another distribution; make them public in "
        "their package:\n" + "\n".join(offending)
    )


@pytest.mark.parametrize("folder", sorted(FORBIDDEN_DEPENDENCIES))
def test_distribution_declares_no_forbidden_dependency(folder: str) -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        declared.extend(extra)
    # The project name leads a requirement: "minicache-client==0.1.0", "torch>=2.6,<2.14".
    names = {
        re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
        for requirement in declared
    }
    assert not names & FORBIDDEN_DEPENDENCIES[folder], (
        f"{folder}/pyproject.toml depends on {sorted(names & FORBIDDEN_DEPENDENCIES[folder])}"
    )


def test_the_checks_see_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text(
        "import numpy\n\n\ndef run():\n"
        "    from minicache_server.metrics import _Metric\n    import torch\n"
    )
    assert imports_of(source) == [
        Import(1, "numpy", None, in_function=False),
        Import(5, "minicache_server.metrics", "_Metric", in_function=True),
        Import(6, "torch", None, in_function=True),
    ]
