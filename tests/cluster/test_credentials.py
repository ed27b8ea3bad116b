"""A front end whose Ray credentials the cluster refuses says so (5001, the cause and the fix), logs it
once, keeps trying slowly, and joins once the credentials are fixed; a cluster without token auth
takes any front end.

What Ray 2.60 itself does is in cluster/identity.py: `ray.init` with a wrong token retries for ~20 s
and raises a bare "Failed to connect"; with RAY_AUTH_MODE=token and no token a GCS client aborts
the process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.cluster.helpers import call, stateless_client
from tests.support.netns import PrivateNetwork
from tests.support.polling import eventually, eventually_sync
from tests.support.ray_multinode import RayCluster, wait_no_leftovers
from tests.support.servers import ServerProcess, start_http_server

pytestmark = pytest.mark.slow

#: One line per refused attempt, from Ray's own GCS client (not ours): counts the attempts.
RAY_REFUSED_LINE = "InvalidAuthToken"
OUR_ERROR = "ERROR cluster.connection: cannot join the Ray cluster"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="module")
def cluster(private_network: PrivateNetwork, ray_executor: None) -> Iterator[RayCluster]:
    """One node (the head) with Ray token authentication on; front ends are the tests' own."""
    started = RayCluster.start(private_network, ("a",))
    try:
        yield started
    finally:
        started.stop()
    wait_no_leftovers(started)


def front_end(cluster: RayCluster, directory: Path, **ray_auth: str) -> ServerProcess:
    """A front end of `cluster` whose Ray auth settings are exactly `ray_auth` (none of the cluster's)."""
    env = {k: v for k, v in cluster.env.items() if k not in AUTH_VARIABLES}
    env.update(ray_auth)
    server = start_http_server(
        directory,
        manifest=cluster.manifest(directory),
        token=cluster.token,
        extra_args=("--executor", "ray", "--ray-address", cluster.address),
        base_env=env,
    )
    cluster.front_ends.append(server)
    return server


def log_of(server: ServerProcess) -> str:
    return server.log_path.read_text(errors="replace")


async def refused(server: ServerProcess, *expected: str) -> dict[str, Any]:
    """Every call answers 5001 naming the cause and the fix; the front end lives on."""
    async with stateless_client(server) as client:
        for tool, arguments in (("create_session", {"resource": "bash"}), ("list_sessions", {})):
            answer = await call(client, tool, arguments)
            assert answer["code"] == 5001, answer
            for words in expected:
                assert words in answer["message"], answer
    assert server.process.poll() is None, log_of(server)
    return answer


async def test_a_wrong_token_answers_5001_naming_the_variable_and_logs_it_once(
    cluster: RayCluster, tmp_path: Path
) -> None:
    server = front_end(cluster, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    with anyio.fail_after(60):
        answer = await refused(server, "refused this front end's Ray token", "RAY_AUTH_TOKEN")
    # Neither token is ever echoed: not to the client, not to the log.
    for token in ("0" * 64, cluster.ray_token):
        assert token not in answer["message"]
        assert token not in log_of(server)
    # Several attempts (Ray logs one line for each), one error line of ours.
    eventually_sync(lambda: log_of(server).count(RAY_REFUSED_LINE) >= 3, 60, what="three refused join attempts")
    assert log_of(server).count(OUR_ERROR) == 1, log_of(server)


async def test_no_token_answers_5001_saying_to_set_the_mode_and_the_token(cluster: RayCluster, tmp_path: Path) -> None:
    """Without RAY_AUTH_MODE=token Ray sends no token, even with RAY_AUTH_TOKEN set: both are named."""
    bare = front_end(cluster, tmp_path)
    token_only = front_end(cluster, tmp_path, RAY_AUTH_TOKEN=cluster.ray_token)
    with anyio.fail_after(60):
        await refused(bare, "sends no Ray token", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN")
        await refused(token_only, "without RAY_AUTH_MODE=token Ray sends no token")


async def test_token_mode_without_a_token_answers_5001_and_the_process_survives(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """RAY_AUTH_MODE=token and no token anywhere (HOME has no ~/.ray/auth_token): a Ray GCS client would
    abort the process; the front end never builds one and says what is missing."""
    server = front_end(cluster, tmp_path, RAY_AUTH_MODE="token")
    with anyio.fail_after(60):
        await refused(server, "has no Ray token", "RAY_AUTH_TOKEN")


async def test_a_fixed_token_file_is_picked_up_without_a_restart(cluster: RayCluster, tmp_path: Path) -> None:
    token_file = tmp_path / "ray-token"
    token_file.write_text("1" * 64)
    server = front_end(cluster, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    with anyio.fail_after(120):
        await refused(server, "refused this front end's Ray token")
        token_file.write_text(cluster.ray_token)
        async with stateless_client(server) as client:

            async def joined() -> dict[str, Any] | None:
                answer = await call(client, "bash_run", {"command": "echo joined"})
                assert answer["code"] in (0, 5001), answer
                return answer if answer["code"] == 0 else None

            ran = await eventually(joined, 90, every=0.5, what="the front end to join with the fixed token")
            assert ran["data"]["stdout"] == "joined\n"
    assert "accepts this front end's credentials now" in log_of(server)


class OpenCluster(RayCluster):
    """A cluster started without Ray token authentication."""

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env.items() if k not in AUTH_VARIABLES}
        env["RAY_AUTH_MODE"] = "disabled"
        return env


async def test_a_cluster_without_token_auth_takes_front_ends_with_or_without_a_token(
    private_network: PrivateNetwork, ray_executor: None, tmp_path: Path
) -> None:
    with PrivateNetwork() as network:  # its own (the module's cluster uses the same fixed ports)
        open_cluster = OpenCluster.create(network)
        try:
            open_cluster.start_nodes(("a",))
            with_token = front_end(open_cluster, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="2" * 64)
            without = front_end(open_cluster, tmp_path)
            with anyio.fail_after(120):
                for server in (with_token, without):
                    async with stateless_client(server) as client:
                        ran = await call(client, "bash_run", {"command": "echo open"})
                        assert ran["code"] == 0, ran
                        assert ran["data"]["stdout"] == "open\n"
        finally:
            open_cluster.stop()
        wait_no_leftovers(open_cluster)
