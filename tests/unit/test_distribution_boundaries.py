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
# The cache server's domain: the servicer converts protobuf to and from its types
# (`minicache_server.service.messages`), so none of these files imports the wire.
DOMAIN_SOURCES = (
    "cache_server/minicache_server/domain.py",
    "cache_server/minicache_server/store/*.py",
    "cache_server/minicache_server/tiers/*.py",
)
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


def wire_imports(path: Path) -> list[tuple[int, str]]:
    """(line, name) of each import of `path` that brings in protobuf or gRPC:
    `google.protobuf`, `grpc*`, `minicache_client.proto`, or any generated `*_pb2` /
    `*_pb2_grpc` module."""
    found = []
    for imported in imports_of(path):
        names = [imported.module, *([imported.name] if imported.name else [])]
        packages = [f"{package}." for package in ("google.protobuf", "minicache_client.proto")]
        if (
            imported.module.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection")
            or f"{imported.module}.".startswith(tuple(packages))
            or any(re.search(r"_pb2(_grpc)?$", name) for name in names)
        ):
            found.append((imported.line, ".".join(names)))
    return found


def test_the_cache_servers_domain_imports_no_protobuf() -> None:
    paths = sorted(path for pattern in DOMAIN_SOURCES for path in ROOT.glob(pattern))
    assert len(paths) >= 4, f"domain sources not found: {DOMAIN_SOURCES}"
    offending = [
        f"{where(path, line)} imports {name}" for path in paths for line, name in wire_imports(path)
    ]
    assert not offending, (
        "the store and the tiers speak domain types; convert messages in "
        "minicache_server/service/messages.py:\n" + "\n".join(offending)
    )


def test_wire_imports_are_recognised(tmp_path: Path) -> None:
    source = tmp_path / "wired.py"
    source.write_text(
        "import numpy\nfrom minicache_client.proto import cache_service_pb2 as pb\n"
        "from minicache_client.protocol import check_id\n"
        "from google.protobuf.message import DecodeError\nimport grpc\n\n\n"
        "def late():\n    import worker_service_pb2_grpc\n"
    )
    assert wire_imports(source) == [
        (2, "minicache_client.proto.cache_service_pb2"),
        (4, "google.protobuf.message.DecodeError"),
        (5, "grpc"),
        (9, "worker_service_pb2_grpc"),
    ]
    # The servicer's conversions are where protobuf belongs.
    messages = ROOT / "cache_server/minicache_server/service/messages.py"
    assert wire_imports(messages)


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
