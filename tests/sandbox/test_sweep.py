"""A server killed outright leaves processes, cgroups and mounts; the next server's sweep removes them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from backends.sandbox import cgroups, sweep_orphans
from tests.sandbox.helpers import host_exists, pid_alive, read_proc

REPO = str(Path(__file__).resolve().parents[2])

#: A stand-in server: makes a `none` and a `sandbox` session, starts escapees, reports, then waits to be killed.
SERVER = textwrap.dedent(
    """
    import json, os, secrets, sys, anyio
    from pathlib import Path
    from backends.policy import Policy
    from backends.sandbox import SandboxSpec, SessionSandbox

    async def main(tmp_root):
        server_id = f"sbxsweep-{os.getpid()}-{secrets.token_hex(3)}"
        scratch = Path(tmp_root) / f"agentflow-{server_id}"
        report = {"server_id": server_id, "scratch": str(scratch), "pids": [], "uids": []}
        for tier in ("none", "sandbox"):
            home = scratch / tier / "home"
            home.mkdir(parents=True)
            box = await SessionSandbox.create(
                SandboxSpec(label=tier, policy=Policy(isolation=tier), server_id=server_id, home=home)
            )
            script = "(setsid sleep 300 >/dev/null 2>&1 &); exec sleep 300"
            await box.spawn(["/bin/bash", "-c", script], env={"PATH": "/usr/bin:/bin"})
            while len(box.pids()) < 2:
                await anyio.sleep(0.01)
            report["pids"] += box.pids()
            report[f"{tier}_pids"] = box.pids()
            report["uids"].append(box.uid)
            report[tier] = box.describe()
        print(json.dumps(report), flush=True)
        await anyio.sleep(600)

    anyio.run(main, sys.argv[1])
    """
)


def other_memory_cgroup(name: str) -> Path | None:
    """A fresh memory cgroup beside this process's own (None without a writable v1 memory hierarchy)."""
    host = cgroups.probe()
    base = host.bases.get("memory")
    if host.version != 1 or base is None:
        return None
    other = base / name
    other.mkdir()
    return other


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-cgroup", "server-in-another-cgroup"])
async def test_sweep_removes_what_a_killed_server_left(tmp_path: Path, elsewhere: bool) -> None:
    other = other_memory_cgroup(f"sbxother-{os.getpid()}-{tmp_path.name}") if elsewhere else None
    if elsewhere and other is None:
        pytest.skip("needs a writable cgroup v1 memory hierarchy to start the server in another cgroup")
    # The stand-in server joins `other` before it starts, like a server a service manager placed elsewhere.
    enter = ["/bin/sh", "-c", 'echo $$ > "$0"/cgroup.procs && exec "$@"', str(other)] if other else []
    server = await anyio.open_process(
        [*enter, sys.executable, "-c", SERVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert server.stdout is not None
        with anyio.fail_after(60):
            line = b""
            async for chunk in server.stdout:
                line += chunk
                if line.endswith(b"\n"):
                    break
        report = json.loads(line)
    finally:
        server.send_signal(signal.SIGKILL)
        await server.aclose()
    scratch = Path(report["scratch"])
    cgroup_dirs = [Path(p) for tier in ("none", "sandbox") for p in report[tier]["cgroup"]["paths"].values()]
    # `sandbox` sessions die with their server (--die-with-parent); `none` ones do not.
    # (the list may hold a short-lived subshell, so only the live ones count)
    survivors = [pid for pid in report["none_pids"] if pid_alive(pid)]
    mounted_before = any(str(scratch) in line for line in read_proc("self", "mountinfo").splitlines())
    try:
        swept = await sweep_orphans(tmp_path)
    finally:
        if other is not None:
            cgroups.remove_tree(other)

    assert survivors
    assert mounted_before
    assert not [pid for pid in report["pids"] if pid_alive(pid)]
    assert set(survivors) <= set(swept.killed)
    assert not [d for d in cgroup_dirs if host_exists(d)]
    assert not host_exists(scratch)
    assert not any(str(scratch) in line for line in read_proc("self", "mountinfo").splitlines())
    assert not any(report["server_id"] in line for line in read_proc("self", "mountinfo").splitlines())
    assert str(scratch) in swept.dirs
    if other is not None:
        assert any(str(other) in p for p in report["none"]["cgroup"]["paths"].values())


async def test_sweep_leaves_live_servers_alone(tmp_path: Path) -> None:
    live = tmp_path / f"agentflow-sbxlive-{os.getpid()}-abcd"
    live.mkdir()
    swept = await sweep_orphans(tmp_path)
    assert host_exists(live)
    assert str(live) not in swept.dirs
