"""The hostile session: each attack runs from a real sandboxed bash and must fail, leaving the host clean.

Tiers `sandbox` and `gvisor` are attacked; `none` isolates nothing by design and is only
checked for what it still promises (limits, cleanup). A tier this host lacks is skipped with
the reason (see `require_tier`), never passed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import anyio
import pytest

from tests.sandbox.helpers import (
    SANDBOXED,
    TIERS,
    BoxFactory,
    host_exists,
    pid_alive,
    read_proc,
    run,
    run_cgroup_dirs,
)
from tests.support.procs import pids_of_uid

ALL = TIERS
#: Touches every page of N MB so the memory is really charged.
HOG = 'x = bytearray(%d << 20); x[::4096] = b"y" * len(x[::4096])'


async def start_sleeper(box, marker: str):
    """A long-running process in `box` whose command line carries `marker`; returns the process."""
    process = await box.spawn(
        ["/bin/bash", "-c", f"exec -a {marker} sleep 300"], env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL
    )
    return process


def host_pids_with(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (including shells on their way to exec)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and marker in read_proc(p, "cmdline")]


def escapees_named(marker: str) -> list[int]:
    """The escaped sleeps themselves: `exec -a <marker>x` puts the marker first in argv."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and read_proc(p, "cmdline").startswith(marker)]


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_cannot_read_or_write_another_sessions_home(make_box: BoxFactory, tier: str) -> None:
    victim = await make_box(tier)
    attacker = await make_box(tier)
    assert (await run(victim, "echo victim-secret > ~/secret"))[0] == 0
    victim_home = victim.spec.home
    script = (
        f"cat {victim_home}/secret; cat /proc/*/root{victim_home}/secret; "
        f"echo pwned > {victim_home}/planted; ls {victim_home.parent}; "
        "grep -rs victim-secret / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr; echo end"
    )
    _status, out = await run(attacker, script)
    assert "victim-secret" not in out
    assert out.rstrip().endswith("end")
    assert not (victim_home / "planted").exists()
    assert (victim_home / "secret").read_text() == "victim-secret\n"


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_cannot_see_signal_or_ptrace_another_sessions_processes(make_box: BoxFactory, tier: str) -> None:
    victim = await make_box(tier)
    attacker = await make_box(tier)
    marker = f"victim{uuid.uuid4().hex[:8]}"
    sleeper = await start_sleeper(victim, marker)
    if tier == "gvisor":
        target = sleeper.pid  # its processes live in the Sentry; the host pid to aim at is runsc's
    else:
        with anyio.fail_after(30):
            while not (found := [p for p in host_pids_with(marker) if read_proc(p, "cmdline").startswith(marker)]):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        (target,) = found
    ptrace = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f'r = libc.ptrace(16, {target}, 0, 0); print("ptrace", r, ctypes.get_errno())'
    )
    script = (
        f"ps -eo args | grep -c ^{marker}; kill -9 {target}; echo kill=$?; "
        f"python3 -c '{ptrace}'; cat /proc/{target}/environ; head -c 10 /proc/{target}/mem; echo end"
    )
    _status, out = await run(attacker, script)
    assert "kill=0" not in out
    assert "ptrace -1" in out
    assert out.splitlines()[0].strip() == "0"  # the victim's sleeper is not in the attacker's process list
    assert pid_alive(target)
    assert sleeper.returncode is None


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_cannot_read_the_servers_environment_or_files(
    make_box: BoxFactory, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"srvsecret{uuid.uuid4().hex}"
    monkeypatch.setenv("AGENTFLOW_TEST_API_KEY", secret)
    box = await make_box(tier)
    script = (
        f"cat /proc/{os.getpid()}/environ; cat /proc/1/environ; grep -as {secret} /proc/*/environ; "
        "ls /root /run /var/lib 2>&1; cat /etc/shadow; echo env-has; env | grep -c AGENTFLOW_TEST; echo end"
    )
    _status, out = await run(box, script)
    assert secret not in out
    assert "root:" not in out  # /etc/shadow is replaced by an empty file
    assert out.rstrip().endswith("end")


class _LoopbackServer:
    """A TCP listener on 127.0.0.1 in the test process that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


@pytest.mark.parametrize("tier", ALL)
async def test_network_none_cannot_reach_host_loopback(make_box: BoxFactory, tier: str) -> None:
    server = _LoopbackServer()
    try:
        box = await make_box(tier, network="none")
        probe = (
            f"import socket\ntry:\n socket.create_connection(('127.0.0.1', {server.port}), timeout=3); "
            "print('reached')\nexcept OSError as e: print('refused', e)"
        )
        _status, out = await run(box, f'python3 -c "{probe}"; cat /proc/net/dev | tail -n +3 | cut -d: -f1')
        assert "refused" in out, out
        assert not server.connected()
        if tier == "sandbox":
            assert out.split()[-1] == "lo"  # the namespace has loopback only
    finally:
        server.sock.close()


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_network_host_does_reach_loopback(make_box: BoxFactory, tier: str) -> None:
    """Control for the test above: the probe would notice a reachable server."""
    server = _LoopbackServer()
    try:
        box = await make_box(tier, network="host")
        probe = f"import socket; socket.create_connection(('127.0.0.1', {server.port}), timeout=5); print('reached')"
        _status, out = await run(box, f'python3 -c "{probe}"')
        assert "reached" in out, out
    finally:
        server.sock.close()


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_cannot_remount_or_write_host_paths(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier)
    name = f"agentflow-attack-{uuid.uuid4().hex[:8]}"
    targets = [f"/usr/{name}", f"/var/tmp/{name}", f"/etc/{name}", f"/{name}"]
    script = (
        "mount -o remount,rw /; mount -o remount,rw,bind / /; mount -t tmpfs none /usr; "
        "mount -o remount,rw /usr; echo mount-done; " + "; ".join(f"echo x > {t}" for t in targets) + "; echo end"
    )
    _status, out = await run(box, script)
    assert "end" in out
    for target in targets:
        assert not host_exists(target), f"{target} appeared on the host"
    assert "tmpfs" not in [line.split()[4] for line in read_proc("self", "mountinfo").splitlines() if "/usr " in line]


async def test_cannot_create_user_namespaces_or_use_denied_syscalls(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    calls = {
        "ptrace_traceme": "(101, 0, 0, 0, 0)",
        "bpf": "(321, 0, 0, 0)",
        "keyctl": "(250, 0, 0, 0, 0)",
        "perf_event_open": "(298, 0, 0, 0, 0, 0)",
        "userfaultfd": "(323, 0)",
        "setns": "(308, 0, 0)",
        "unshare_newuser": "(272, 0x10000000)",
        "clone_newuser": "(56, 0x10000000 | 17, 0, 0, 0, 0)",
        "clone3": "(435, 0, 0)",
        "mount": "(165, 0, 0, 0, 0, 0)",
        "fsopen": "(430, 0, 0)",
        "io_uring_setup": "(425, 1, 0)",
        "kexec_load": "(246, 0, 0, 0, 0)",
        "init_module": "(175, 0, 0, 0)",
        "tiocsti": "(16, 0, 0x5412, 0)",
    }
    lines = ["import ctypes", "libc = ctypes.CDLL(None, use_errno=True)"]
    for name, args in calls.items():
        lines.append(f"r = libc.syscall{args}; print('{name}', r, ctypes.get_errno())")
    script = "\n".join(lines)
    _status, out = await run(
        box, f'unshare -U true; echo unshare=$?; unshare -r true; echo unshare_r=$?; python3 -c "{script}"'
    )
    results = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[0] in calls}
    assert "unshare=0" not in out
    assert "unshare_r=0" not in out
    for name in calls:
        expected = "38" if name == "clone3" else "1"  # ENOSYS makes glibc fall back to clone; else EPERM
        assert results[name] == ["-1", expected], (name, out)


@pytest.mark.slow
async def test_user_namespaces_in_gvisor_stay_inside_gvisor(make_box: BoxFactory) -> None:
    """gVisor implements namespaces in its own kernel: `unshare -U` may succeed but gains nothing on the host."""
    box = await make_box("gvisor")
    name = f"agentflow-attack-{uuid.uuid4().hex[:8]}"
    _status, out = await run(box, f"unshare -r sh -c 'id -u; mount -t tmpfs none /usr; echo x > /usr/{name}'; echo end")
    assert "end" in out
    assert not host_exists(f"/usr/{name}")


@pytest.mark.parametrize("tier", ALL)
async def test_pid_limit_bounds_a_fork_bomb(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier, pids=40)
    bomb = (
        "import os, time\nn = 0\nwhile True:\n try:\n  pid = os.fork()\n except OSError as e:\n"
        "  print('stopped', n, e.errno, flush=True); break\n if pid == 0:\n"
        "  null = os.open('/dev/null', os.O_WRONLY); os.dup2(null, 1); os.dup2(null, 2)\n"
        "  time.sleep(300); os._exit(0)\n n += 1"
    )
    _status, out = await run(box, f'python3 -c "{bomb}"; echo shell-alive')
    assert "stopped" in out, out
    assert "shell-alive" in out
    forked = int(out.split("stopped")[1].split()[0])
    assert forked < 40
    if box.describe().get("cgroup"):
        assert len(box.pids()) <= 40
        assert box.limit_hits().get("pids_max", 1) >= 1


@pytest.mark.parametrize("tier", ["none", "sandbox"])
async def test_memory_limit_kills_the_offender_not_the_shell(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier, memory_mb=64)
    _status, out = await run(box, f"python3 -c '{HOG % 300}'; echo rc=$?")
    assert "rc=137" in out, out  # SIGKILL from the memory cgroup's OOM killer; the shell went on
    assert box.limit_hits()["memory_oom_kills"] >= 1


@pytest.mark.slow
async def test_memory_limit_in_gvisor(make_box: BoxFactory) -> None:
    """gVisor's Sentry holds the sandbox's memory, so hitting the limit ends the whole container."""
    box = await make_box("gvisor", memory_mb=128)
    status, out = await run(box, f"python3 -c '{HOG % 400}'; echo rc=$?")
    assert "rc=0" not in out
    assert status != 0 or "rc=137" in out, out


@pytest.mark.parametrize("tier", ALL)
async def test_disk_limit_gives_enospc(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier, disk_mb=8)
    tmp = "" if tier == "none" else "dd if=/dev/zero of=/tmp/big bs=1M count=20 2>&1 | grep -i space; "
    _status, out = await run(box, f"dd if=/dev/zero of=~/big bs=1M count=20 2>&1 | grep -i space; {tmp}du -sm ~")
    assert "No space left on device" in out, out
    assert int(out.split()[-2]) <= 9  # du -m rounds up
    if tier != "none":
        assert out.count("No space left on device") == 2, out


@pytest.mark.parametrize("tier", ALL)
async def test_detached_processes_die_with_the_session(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier)
    marker = f"escapee{uuid.uuid4().hex[:8]}"
    # Escapees in their own sessions, with an empty environment, re-parented; the main program
    # stays alive (in `sandbox`, bwrap's pid 1 would otherwise end them all when it exits).
    script = (
        f"setsid nohup env -i /bin/bash -c '(exec -a {marker}a sleep 300 &) ; exec -a {marker}b sleep 300' "
        ">/dev/null 2>&1 < /dev/null & disown; "
        f"(setsid /bin/bash -c 'exec -a {marker}c sleep 300' >/dev/null 2>&1 &); echo launched; exec sleep 300"
    )
    process = await box.spawn(["/bin/bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE)
    assert process.stdout is not None
    with anyio.fail_after(30):
        assert b"launched" in await process.stdout.receive()
    escapees: list[int] = []
    if tier != "gvisor":  # gVisor's processes live in the Sentry, not in the host process table
        # Wait for the three sleeps themselves: the shells that launch them also carry the
        # marker on their command lines, but only until they exec or exit.
        with anyio.fail_after(30):
            while len(escapees_named(marker)) < 3:  # noqa: ASYNC110 - no event for another process's start
                await anyio.sleep(0.01)
        escapees = escapees_named(marker)
        assert set(escapees) <= set(box.pids())
    members = box.pids()
    assert members
    await box.aclose()
    assert not host_pids_with(marker)
    assert not [pid for pid in members + escapees if pid_alive(pid)]
    if tier != "none":
        assert not pids_of_uid(box.uid)
    assert not [p for p in run_cgroup_dirs() for _ in p.glob(box.spec.label)]


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_uids_are_private_and_not_root(make_box: BoxFactory, chain: str, tier: str) -> None:
    first = await make_box(tier)
    second = await make_box(tier)
    assert first.uid != second.uid
    for box in (first, second):
        assert box.uid != 0
        assert box.uid != os.geteuid() or os.geteuid() != 0
        _status, out = await run(box, "id -u; id -g")
        assert out.split() == [str(box.uid), str(box.uid)]
    if os.geteuid() == 0:
        process = await first.spawn(["/bin/sleep", "300"], env={})
        if first.tier == "sandbox":
            inner = await first.wait_inner_pid(process)
            assert inner is not None
            for pid in (process.pid, inner):  # the wrapper and the program: both unprivileged on the host
                uids = next(line for line in read_proc(pid, "status").splitlines() if line.startswith("Uid:"))
                assert set(uids.split()[1:]) == {str(first.uid)}


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_environment_from_config_never_reaches_host_processes(
    make_box: BoxFactory, chain: str, tier: str
) -> None:
    box = await make_box(tier)
    evil = f"/tmp/evil-{uuid.uuid4().hex[:8]}.so"
    process = await box.spawn(
        ["/bin/bash", "-c", "echo inside:$LD_PRELOAD; exec sleep 300"],
        env={"PATH": "/usr/bin:/bin", "LD_PRELOAD": evil, "BASH_ENV": "/tmp/x"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    with anyio.fail_after(30):
        assert evil in (await process.stdout.receive()).decode()
    host_side = [process.pid, *[int(c) for c in read_proc(process.pid, f"task/{process.pid}/children").split()]]
    for pid in host_side:
        if tier == "sandbox" and pid != process.pid:
            continue  # the pid-1 reaper is already inside the sandbox
        assert evil not in read_proc(pid, "environ"), pid
        assert evil not in read_proc(pid, "cmdline"), pid
