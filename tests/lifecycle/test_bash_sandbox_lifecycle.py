"""Every process of a sandboxed bash session dies with it: destroy, TTL, disconnect, SIGTERM, SIGKILL+restart.

Processes are counted by sandbox membership, never by environment tags (each test's session
starts processes that drop them and double-fork): the session cgroups under
`agentflow/<server_id>/`, whose server id names the server process (in-process: this test
process; subprocess servers: a run id of their own, so nothing else on the machine is counted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from mcp import Client
from mcp.client.sse import sse_client

from backends.policy import Policy
from backends.sandbox import cgroups
from tests.security.bash_sandbox import Client as EngineClient
from tests.security.bash_sandbox import bash_engine, pid_alive, require_tier, run_cgroup_dirs, run_pids
from tests.support.polling import eventually
from tests.support.ports import free_port

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
        assert not [pid for pid in members if pid_alive(pid)]
        assert run_pids(label) == []
        assert run_cgroup_dirs(label) == []


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


@dataclass
class Server:
    process: Process
    run_id: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cgroup_dirs(self) -> list[Path]:
        """Session cgroups of this server (its server id starts with its run id)."""
        found: list[Path] = []
        for base in set(cgroups.probe().bases.values()):
            for server_dir in (base / "agentflow").glob(f"{self.run_id}-*"):
                found += [p for p in server_dir.iterdir() if p.is_dir()]
        return found

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for directory in self.cgroup_dirs():
            try:
                pids.update(int(x) for x in (directory / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return sorted(p for p in pids if pid_alive(p))


def write_manifest(directory: Path, tier: str) -> Path:
    manifest = {
        "server": {"session_ttl": 60, "disconnect_grace": 0, "host": "127.0.0.1", "log_level": "WARNING"},
        "resources": {"bash": {"enabled": True, "config": {"timeout": 20}, "policy": {"isolation": tier}}},
    }
    path = directory / f"manifest-{tier}.json"
    path.write_text(json.dumps(manifest))
    return path


def _healthy(server: Server) -> bool:
    """GET /health (sync on purpose: a 2 s local request inside a polling loop)."""
    try:
        with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
            return json.loads(response.read()).get("status") == "running"
    except (OSError, ValueError):
        return False


async def start_server(directory: Path, tier: str) -> Server:
    run_id = f"lc{uuid.uuid4().hex[:10]}"
    port = free_port()
    log = directory / f"server-{run_id}.log"
    command = [str(Path(sys.executable).with_name("agentflow-sandbox"))]
    argv = [*command, "serve", "--transport", "http", "--manifest", str(write_manifest(directory, tier))]
    with log.open("wb") as sink:
        process = await anyio.open_process(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AGENTFLOW_RUN_ID": run_id},
        )
    server = Server(process, run_id, port, log)
    try:
        await eventually(lambda: process.returncode is not None or _healthy(server), 60, what="a healthy server")
    except BaseException:  # pytest.fail is a BaseException
        process.kill()
        raise
    assert process.returncode is None, log.read_text()[-2000:]
    return server


@asynccontextmanager
async def serving(directory: Path, tier: str) -> AsyncIterator[Server]:
    """A server subprocess, SIGKILLed at the end if the test left it running."""
    server = await start_server(directory, tier)
    try:
        yield server
    finally:
        if server.process.returncode is None:
            server.process.kill()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await server.process.wait()


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
        async with Client(sse_client(f"{server.url}/sse")) as client:
            await _start_escapees(client)
            await eventually(lambda: len(server.pids()) >= 3, 20)
            members = server.pids()
        await eventually(lambda: not server.cgroup_dirs(), 20)
        assert not [pid for pid in members if pid_alive(pid)]
        assert _healthy(server)


@pytest.mark.slow
@pytest.mark.parametrize("tier", TIERS)
async def test_sigterm_shutdown_leaves_no_process(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    async with serving(tmp_path, tier) as server:
        # A stateless HTTP client: its session lives on after the client leaves, until the server goes.
        async with Client(f"{server.url}/mcp") as client:
            await _start_escapees(client)
        await eventually(lambda: len(server.pids()) >= 3, 20)
        members = server.pids()
        server.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await server.process.wait()
    assert not [pid for pid in members if pid_alive(pid)]
    assert server.cgroup_dirs() == []


@pytest.mark.slow
@pytest.mark.parametrize("tier", TIERS)
async def test_a_new_server_sweeps_what_a_sigkilled_one_left(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    async with serving(tmp_path, tier) as server:
        async with Client(f"{server.url}/mcp") as client:
            await _start_escapees(client)
        await eventually(lambda: len(server.pids()) >= 3, 20)
        members = server.pids()
        server.process.kill()  # SIGKILL: no cleanup code runs
        with anyio.fail_after(10):
            await server.process.wait()
    scratch = [path async for path in anyio.Path("/tmp").glob(f"agentflow-{server.run_id}-*")]
    # What the dead server left: its cgroups (and, in tier none, its sessions' processes; the
    # sandbox tier's die with their bwrap, which dies with its parent).
    assert server.cgroup_dirs()
    if tier == "none":
        assert [pid for pid in members if pid_alive(pid)]
    async with serving(tmp_path, tier):
        assert server.cgroup_dirs() == []
        assert not [pid for pid in members if pid_alive(pid)]
        assert not [path for path in scratch if await path.exists()]
