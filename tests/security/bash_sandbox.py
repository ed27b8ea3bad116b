"""Helpers for the hostile-session tests of bash: an engine, calls through it, this run's processes.

Everything goes through `Engine.call`, as an MCP client's calls would. Leak checks count only
this test process's sessions: their cgroups live under `agentflow/<server_id>/` (the server id
names this process), so other runs on the machine never disturb the counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from backends.base import Runtime
from backends.bash import BashBackend
from backends.policy import Policy
from backends.sandbox import cgroups, mechanisms
from session.engine import Engine
from session.envelope import Envelope
from session.models import Caller

ISOLATED_TIERS = ("sandbox", "gvisor")


def require_tier(tier: str) -> None:
    """Skip (with the host's reason) when this machine cannot provide `tier`."""
    state = mechanisms()["tiers"][tier]
    if state != "available":
        pytest.skip(f"isolation {tier!r} {state}")


def server_id() -> str:
    return Runtime.for_process().server_id


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def run_cgroup_dirs(label: str = "") -> list[Path]:
    """This process's session cgroup directories (of one session, if `label` is given)."""
    found: list[Path] = []
    for base in set(cgroups.probe().bases.values()):
        root = base / "agentflow" / server_id()
        try:
            found += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(label)]
        except FileNotFoundError:
            continue  # no session of this server (its directory goes with the last one, maybe right now)
    return found


def run_pids(label: str = "") -> list[int]:
    """Live processes in this process's session cgroups (of one session, if `label` is given)."""
    pids: set[int] = set()
    for directory in run_cgroup_dirs(label):
        try:
            pids.update(int(x) for x in (directory / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            continue
    return sorted(p for p in pids if pid_alive(p))


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if p == str(path) or p.startswith(prefix)]


@asynccontextmanager
async def bash_engine(policy: Policy, *, ttl: float = 300, **defaults: Any) -> AsyncIterator[Engine]:
    """An engine serving only `bash` under `policy` (config defaults as the manifest would give)."""
    async with Engine({"bash": BashBackend("bash", policy=policy, defaults=defaults)}, session_ttl=ttl) as engine:
        yield engine


class Client:
    """One worker's calls through the engine (what an MCP client's tool calls become)."""

    def __init__(self, engine: Engine, worker: str) -> None:
        self.engine = engine
        self.caller = Caller(worker=worker)

    async def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Envelope:
        return (await self.engine.call(self.caller, tool, arguments or {})).envelope

    async def create(self, config: dict[str, Any] | None = None) -> str:
        args: dict[str, Any] = {"resource": "bash"}
        if config is not None:
            args["config"] = config
        envelope = await self.call("create_session", args)
        assert envelope.ok, envelope.message
        return str(envelope.data["session_id"])

    async def bash(self, command: str, session_id: str | None = None, limit: float | None = None) -> Envelope:
        """`bash_run`; `limit` is the command's timeout argument."""
        args: dict[str, Any] = {"command": command}
        if session_id is not None:
            args["session_id"] = session_id
        if limit is not None:
            args["timeout"] = limit
        return await self.call("bash_run", args)

    async def out(self, command: str, session_id: str | None = None, limit: float | None = None) -> str:
        """stdout+stderr of a command that must not fail at the protocol level (any exit code is fine)."""
        envelope = await self.bash(command, session_id, limit)
        assert envelope.code == 0, envelope.message
        return str(envelope.data["stdout"]) + str(envelope.data["stderr"])

    def details(self, session_id: str) -> dict[str, Any]:
        for view in self.engine.list_sessions(self.caller, details=True, everything=True):
            if view.session_id == session_id:
                return dict(view.details or {})
        raise LookupError("no such session")

    def label(self, session_id: str) -> str:
        return self.engine.sessions[session_id].label
