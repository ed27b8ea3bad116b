"""The Ray front end without its cluster: it serves 5002 at once and keeps trying to join.

No cluster listens at the address these tests give, so nothing here starts or joins Ray (the
GCS port is probed over TCP first); rejoining a restarted head is in tests/cluster/test_faults.py.
"""

from __future__ import annotations

import anyio
import pytest

from tests.executors import FAKES, manifest_of
from tests.support.ports import free_port

pytest.importorskip("ray")

from cluster.connection import gcs_endpoint  # (only with ray installed)
from cluster.executor import RayExecutor


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("[::1]:6379", ("::1", 6379)),
        ("head.internal:6380", ("head.internal", 6380)),
        ("auto", None),
        ("10.0.0.5", None),
        ("ray://10.0.0.5:10001", None),
    ],
)
def test_the_gcs_endpoint_is_probed_only_for_plain_addresses(address, endpoint):
    assert gcs_endpoint(address) == endpoint


async def test_a_front_end_without_its_cluster_serves_5002_and_keeps_trying():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with anyio.fail_after(30):
        async with RayExecutor(manifest_of(FAKES), address=address) as front:
            for tool, arguments in (("create_session", {"resource": "fake"}), ("list_sessions", {})):
                outcome = await front.call("alice", tool, arguments)
                assert outcome.envelope.code == 5002, outcome.envelope
                assert outcome.envelope.message == (
                    f"the Ray cluster at {address} is unreachable; retrying (retry in a few seconds)"
                )
            assert front.status()["cluster_connected"] is False
            # A bad request is still answered as such: 5002 only stands for what needs the cluster.
            unknown = await front.call("alice", "no_such_tool", {})
            assert unknown.envelope.code != 5002, unknown.envelope
