"""Fixtures of the multi-node tests: a private network, a real two-node Ray cluster, front ends.

See tests/support/ray_multinode.py (the cluster) and tests/support/netns.py (why the test thread
moves into a private network namespace for the module's duration, and how).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import netns
from tests.support.netns import PrivateNetwork
from tests.support.ray_multinode import RayCluster, executor_missing, ray_missing, wait_no_leftovers


@pytest.fixture(scope="module")
def private_network() -> Iterator[PrivateNetwork]:
    """The calling (main) thread inside a fresh network namespace with only `lo`, for the module."""
    reason = netns.available() or ray_missing()
    if reason is not None:
        pytest.skip(reason)
    with PrivateNetwork() as network:
        yield network
        # A thread started inside would keep the namespace (and any socket it opens) after we leave.
        stray = network.stray_threads()
    assert not stray, f"threads left inside the cluster's network namespace: {stray}"


@pytest.fixture(scope="module")
def ray_cluster(private_network: PrivateNetwork) -> Iterator[RayCluster]:
    """Nodes a (head) and b up; on teardown everything stopped and proved gone."""
    cluster = RayCluster.start(private_network)
    try:
        yield cluster
    finally:
        cluster.stop()
    wait_no_leftovers(cluster)


@pytest.fixture(scope="module")
def ray_executor() -> None:
    """Skip when this tree has no `serve --executor ray` (the executor lands on its own branch)."""
    reason = executor_missing()
    if reason is not None:
        pytest.skip(reason)
