"""The committed stubs are exactly what `protos/generate.sh` produces from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = tuple(
    f"{service}{suffix}"
    for service in ("cache_service", "worker_service")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    for name in GENERATED:
        fresh = (tmp_path / "minicache_client" / "proto" / name).read_text()
        committed = (ROOT / "client" / "minicache_client" / "proto" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `bash protos/generate.sh` and commit"
