"""Every process of a sandboxed bash session dies with it: destroy, TTL, disconnect, SIGTERM, SIGKILL+restart.

Processes are counted by sandbox membership, never by environment tags (each test's session
starts processes that drop them and double-fork): the session cgroups under
`agentflow/<server_id>/`, whose server id is `<this run's id>-<server pid>-<hex>` (in-process:
this test process; subprocess servers: their own pid), so nothing else on the machine is counted.
"""

from __future__ import annotations

import signal
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from backends.policy import Policy
from backends.sandbox import cgroups
from tests.security.bash_sandbox import Client as EngineClient
from tests.security.bash_sandbox import bash_engine, pid_alive, require_tier, run_cgroup_dirs, run_pids
from tests.support import leaks
from tests.support.manifests import write_manifest
from tests.support.polling import eventually
from tests.support.servers import ServerProcess, start_http_server

#: Detached, tag-dropping, double-forked processes: what a hostile session leaves to outlive it.
ESCAPEES = (
    "env -i setsid nohup sleep 1000 >/dev/null 2>&1 & "
    "( ( env -u AGENTFLOW_SESSION setsid sleep 1001 </dev/null >/dev/null 2>&1 & ) & ); echo started"
)
TIERS = ("none", "sandbox", "gvisor")


# -- in-process engine: destroy and TTL ------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
async def test_destroy_leaves_no_process_and_no_cgroup(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(Policy(isolation=tier)) as engine:
        client = EngineClient(engine, "w")
        sid = await client.create()
        label = client.label(sid)
        await client.out(ESCAPEES, sid)
        members = run_pids(label)
        assert members
        assert (await client.call("destroy_session", {"session_id": sid})).ok
        # Killed before the destroy answered; reaping and cgroup removal finish in the
        # background within a bounded moment.
        await eventually(lambda: not [pid for pid in members if pid_alive(pid)], 10)
        await eventually(lambda: run_pids(label) == [] and run_cgroup_dirs(label) == [], 10)


@pytest.mark.parametrize("tier", TIERS)
async def test_ttl_expiry_leaves_no_process_and_no_cgroup(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(Policy(isolation=tier), ttl=1.0) as engine:
        client = EngineClient(engine, "w")
        sid = await client.create()
        label = client.label(sid)
        await client.out(ESCAPEES, sid)
        members = run_pids(label)
        await eventually(lambda: not run_cgroup_dirs(label), 20)
        assert not [pid for pid in members if pid_alive(pid)]
        assert sid not in engine.sessions


# -- server subprocesses: disconnect, SIGTERM, SIGKILL then a new server ---------------------


def server_cgroup_dirs(server: ServerProcess) -> list[Path]:
    """Session cgroups of one server subprocess (its server id is `<run id>-<its pid>-<hex>`)."""
    found: list[Path] = []
    for base in set(cgroups.probe().bases.values()):
        for server_dir in (base / "agentflow").glob(f"{leaks.run_id()}-{server.process.pid}-*"):
            found += [p for p in server_dir.iterdir() if p.is_dir()]
    return found


def server_session_pids(server: ServerProcess) -> list[int]:
    pids: set[int] = set()
    for directory in server_cgroup_dirs(server):
        try:
            pids.update(int(x) for x in (directory / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            continue
    return sorted(p for p in pids if pid_alive(p))


async def start_server(directory: Path, tier: str) -> ServerProcess:
    manifest = write_manifest(
        directory,
        session_ttl=60,
        resources={"bash": {"enabled": True, "config": {"timeout": 20}, "policy": {"isolation": tier}}},
        name=f"manifest-{uuid.uuid4().hex[:8]}.json",
    )
    return await anyio.to_thread.run_sync(lambda: start_http_server(directory, manifest=manifest))


@asynccontextmanager
async def serving(directory: Path, tier: str) -> AsyncIterator[ServerProcess]:
    """A server subprocess, SIGKILLed at the end if the test left it running."""
    server = await start_server(directory, tier)
    try:
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: server.stop(signal.SIGKILL))


async def exited(server: ServerProcess, within: float = 30) -> int:
    return await anyio.to_thread.run_sync(lambda: server.process.wait(within))


@asynccontextmanager
async def http_client(server: ServerProcess) -> AsyncIterator[Client]:
    """A stateless streamable-HTTP client (no worker: its sessions outlive it, until the server goes)."""
    async with server.http_client() as http, Client(streamable_http_client(server.mcp_url, http_client=http)) as c:
        yield c


def _data(result: Any) -> dict[str, Any]:
    envelope = result.structured_content
    assert envelope["code"] == 0, envelope
    return dict(envelope["data"])


async def _start_escapees(client: Client) -> str:
    sid = str(_data(await client.call_tool("create_session", {"resource": "bash"}))["session_id"])
    out = _data(await client.call_tool("bash_run", {"command": ESCAPEES, "session_id": sid}))
    assert "started" in out["stdout"]
    return sid


@pytest.mark.slow
@pytest.mark.parametrize("tier", TIERS)
async def test_disconnect_ends_the_session_and_its_processes(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    async with serving(tmp_path, tier) as server:
        async with Client(sse_client(server.sse_url, headers=server.headers)) as client:
            await _start_escapees(client)
            await eventually(lambda: len(server_session_pids(server)) >= 3, 20)
            members = server_session_pids(server)
        await eventually(lambda: not server_cgroup_dirs(server), 20, what="the session's cgroups to go")
        assert not [pid for pid in members if pid_alive(pid)]
        assert server.health() is not None


@pytest.mark.slow
@pytest.mark.parametrize("tier", TIERS)
async def test_sigterm_shutdown_leaves_no_process(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    async with serving(tmp_path, tier) as server:
        async with http_client(server) as client:
            await _start_escapees(client)
        await eventually(lambda: len(server_session_pids(server)) >= 3, 20)
        members = server_session_pids(server)
        server.process.send_signal(signal.SIGTERM)
        await exited(server)
        assert not [pid for pid in members if pid_alive(pid)]
        assert server_cgroup_dirs(server) == []


@pytest.mark.slow
@pytest.mark.parametrize("tier", TIERS)
async def test_a_new_server_sweeps_what_a_sigkilled_one_left(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    async with serving(tmp_path, tier) as server:
        async with http_client(server) as client:
            await _start_escapees(client)
        await eventually(lambda: len(server_session_pids(server)) >= 3, 20)
        members = server_session_pids(server)
        server.process.kill()  # SIGKILL: no cleanup code runs
        await exited(server)
        scratch = [path async for path in anyio.Path(tempfile.gettempdir()).glob(f"agentflow-*-{server.process.pid}-*")]
        # What the dead server left: its cgroups (and, in tier none, its sessions' processes; the
        # sandbox tier's die with their bwrap, which dies with its parent).
        assert server_cgroup_dirs(server)
        if tier == "none":
            assert [pid for pid in members if pid_alive(pid)]
        async with serving(tmp_path, tier):
            assert server_cgroup_dirs(server) == []
            assert not [pid for pid in members if pid_alive(pid)]
            assert not [path for path in scratch if await path.exists()]
