"""A local cluster for the fault drills: three cache servers, two inference workers and
one Redis (drill_cluster.py). One cluster per test module (the workers load the model
once, about 30-80 s on two busy cores); the drills leave it serving, except where a
drill says otherwise."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from drill_cluster import DEVICE_BUDGET, GRACE_S, NET, Cluster, DrillCluster


@pytest.fixture(scope="module")
def drill_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrillCluster]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run deploy/local/setup.sh")
    cluster = Cluster(
        tmp_path_factory.mktemp("cluster"),
        servers=3,
        workers=2,
        redis="single",
        device_budget=DEVICE_BUDGET,
        grace_s=GRACE_S,
        net=NET,
        ready_timeout_s=300,
    )
    with cluster:
        yield DrillCluster(cluster)
