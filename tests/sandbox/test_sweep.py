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

from backends.sandbox import sweep_orphans
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
            report["uids"].append(box.uid)
            report[tier] = box.describe()
        print(json.dumps(report), flush=True)
        await anyio.sleep(600)

    anyio.run(main, sys.argv[1])
    """
)


async def test_sweep_removes_what_a_killed_server_left(tmp_path: Path) -> None:
    server = await anyio.open_process(
        [sys.executable, "-c", SERVER, str(tmp_path)],
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
        await server.wait()
    scratch = Path(report["scratch"])
    cgroup_dirs = [Path(p) for tier in ("none", "sandbox") for p in report[tier]["cgroup"]["paths"].values()]
    # `sandbox` sessions die with their server (--die-with-parent); `none` ones do not.
    survivors = [pid for pid in report["pids"] if pid_alive(pid)]
    assert survivors
    assert any(str(scratch) in line for line in read_proc("self", "mountinfo").splitlines())

    swept = await sweep_orphans(tmp_path)

    assert not [pid for pid in report["pids"] if pid_alive(pid)]
    assert set(survivors) <= set(swept.killed)
    assert not [d for d in cgroup_dirs if host_exists(d)]
    assert not host_exists(scratch)
    assert not any(str(scratch) in line for line in read_proc("self", "mountinfo").splitlines())
    assert not any(report["server_id"] in line for line in read_proc("self", "mountinfo").splitlines())
    assert str(scratch) in swept.dirs


async def test_sweep_leaves_live_servers_alone(tmp_path: Path) -> None:
    live = tmp_path / f"agentflow-sbxlive-{os.getpid()}-abcd"
    live.mkdir()
    swept = await sweep_orphans(tmp_path)
    assert host_exists(live)
    assert str(live) not in swept.dirs
