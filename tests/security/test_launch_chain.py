"""What the start of every spawn guarantees, with the launcher and with the fallback chain alike.

The launcher (backends/sandbox/launcher.c) replaced `sh` + `setpriv` + `env`; where it cannot be
built the old chain runs. Both must give the same: the session's uid with no groups and no
capabilities (on the host side and inside), every process in the session's cgroups, default
signal dispositions, and no descriptor of the server inside.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from backends.sandbox import SessionSandbox
from tests.sandbox.helpers import SANDBOXED, TIERS, BoxFactory, inheritable_capability, read_proc, run, start_ready
from tests.support import procs

ZERO_CAPS = "0000000000000000"


def status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def assert_unprivileged(fields: dict[str, str], uid: int, where: str) -> None:
    assert fields["Uid"].split() == [str(uid)] * 4, where
    assert fields["Gid"].split() == [str(uid)] * 4, where
    assert fields["Groups"] == "", where
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        # gVisor's /proc has no CapAmb line; every line that is there must be empty.
        assert fields.get(cap, ZERO_CAPS) == ZERO_CAPS, (where, cap, fields.get(cap))


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_session_processes_have_its_uid_no_groups_and_no_capabilities(
    make_box: BoxFactory, chain: str, tier: str
) -> None:
    box = await make_box(tier)
    with inheritable_capability():
        status, out = await run(box, "cat /proc/self/status")
        process = await box.spawn(["/bin/sleep", "300"], env={})
    assert status == 0, out
    assert_unprivileged(status_fields(out), box.uid, "inside")
    if tier == "sandbox" and os.geteuid() == 0:
        # The host-side wrapper (bwrap, where the launcher switched uid) and its pid-1 reaper.
        inner = await box.wait_inner_pid(process)
        assert inner is not None
        for pid in [process.pid, *procs.descendants(process.pid)]:
            assert_unprivileged(status_fields(read_proc(pid, "status")), box.uid, f"host pid {pid}")


def _session_cgroup_paths(box: SessionSandbox) -> dict[str, str]:
    """controller -> the session's cgroup path as /proc/PID/cgroup shows it on the host."""
    paths = {}
    for ctrl, directory in box.describe()["cgroup"]["paths"].items():
        mount = box._cgroup.host.mounts[ctrl] if box._cgroup else Path("/")
        paths[ctrl] = "/" + str(Path(directory).relative_to(mount))
    return paths


def _cgroups_of(pid: int) -> dict[str, str]:
    found = {}
    for line in read_proc(pid, "cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        for ctrl in ctrls.split(",") if ctrls else ["unified"]:
            found[ctrl] = path
    return found


@pytest.mark.parametrize("tier", TIERS)
async def test_every_process_of_a_spawn_is_in_every_cgroup_of_the_session(
    make_box: BoxFactory, chain: str, tier: str
) -> None:
    box = await make_box(tier)
    if box._cgroup is None:
        pytest.skip("no cgroups on this host")
    expected = _session_cgroup_paths(box)
    process = await start_ready(box, "sleep 300 & (setsid sleep 301 &); echo ready; wait")
    # The host's view of the tree under the spawned process (the launcher became bwrap or
    # runsc or the program itself), every thread's process included.
    tree = [process.pid, *procs.descendants(process.pid)]
    assert len(tree) >= 2
    members = set(box.pids())
    assert set(tree) <= members | {pid for pid in tree if not procs.alive(pid)}
    # The tree and whatever left it (the setsid'd sleep, re-parented on the host in tier `none`).
    for pid in set(tree) | members:
        groups = _cgroups_of(pid)
        if not groups:
            continue  # exited meanwhile
        for ctrl, path in expected.items():
            key = ctrl if box._cgroup is not None and box._cgroup.host.version == 1 else "unified"
            assert groups[key] == path, (pid, procs.cmdline(pid), ctrl)


@pytest.mark.parametrize("tier", TIERS)
async def test_no_descriptor_of_the_server_reaches_the_program(make_box: BoxFactory, chain: str, tier: str) -> None:
    box = await make_box(tier)
    # An inheritable descriptor in the server, as a careless library might leave one.
    leaky = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaky, True)
    try:
        status, out = await run(box, "ls /proc/self/fd | tr '\\n' ' '; echo; ls -l /proc/self/fd")
    finally:
        os.close(leaky)
    assert status == 0, out
    lines = out.splitlines()
    # 0, 1, 2 and the directory `ls` reads; nothing else (no cgroup.procs, nothing of the server).
    assert lines[0].split() == ["0", "1", "2", "3"], out
    assert "cgroup" not in out


@pytest.mark.parametrize("tier", ["none", "sandbox"])
async def test_signal_dispositions_and_mask_start_at_their_defaults(
    make_box: BoxFactory, chain: str, tier: str
) -> None:
    box = await make_box(tier)
    ignored = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGQUIT})
    try:
        # awk, not bash: a shell adjusts some dispositions of its own.
        status, out = await run(box, "awk '/^Sig(Ign|Blk)/ {print $1, $2}' /proc/self/status")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert status == 0, out
    assert out.split("\n")[:2] == ["SigBlk: 0000000000000000", "SigIgn: 0000000000000000"], out
