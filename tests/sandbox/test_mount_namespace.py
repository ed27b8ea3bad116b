"""Each session's mounts live in its own mount namespace: never on the host, never in another session's.

Why it matters: every sandbox start copies the mounts of the namespace it starts from, so host
mounts per live session made each start slower for everyone (and a dead server left them behind).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest

from backends.policy import Policy
from backends.sandbox import SandboxSpec, SessionSandbox, hostfs, launcher
from tests.sandbox.helpers import (
    CHAINS,
    GVISOR,
    RUN_SERVER_ID,
    BoxFactory,
    read_proc,
    require_tier,
    run,
    use_chain,
)


def host_mount_points() -> list[str]:
    return [line.split()[4] for line in read_proc("self", "mountinfo").splitlines()]


def namespace_mount_points(box: SessionSandbox) -> list[str]:
    """Mount points of the session's own namespace (the one each of its spawns starts from)."""
    fd = box._storage.namespace_fd
    assert fd is not None
    listing = subprocess.run(
        ["nsenter", f"--mount=/proc/self/fd/{fd}", "cat", "/proc/self/mountinfo"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        pass_fds=(fd,),
    )
    return [line.split()[4] for line in listing.stdout.splitlines()]


def stage_of(box: SessionSandbox) -> str:
    return str(hostfs.STAGE_ROOT / RUN_SERVER_ID / box.spec.label)


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("tier", ["sandbox", GVISOR])
async def test_a_sessions_mounts_are_its_own(
    make_box: BoxFactory, tier: str, chain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_chain(chain, monkeypatch)
    boxes = [await make_box(tier) for _ in range(3)]
    for box in boxes:
        status, out = await run(box, f"echo {box.spec.label} > ~/mine; cat ~/mine; echo t > /tmp/t; cat /tmp/t")
        assert (status, out) == (0, f"{box.spec.label}\nt\n")
    host = host_mount_points()
    on_host = [p for p in host if p.startswith(str(hostfs.STAGE_ROOT / RUN_SERVER_ID))]
    assert not on_host, "a session mounted on the host"
    assert not [p for b in boxes for p in host if p == str(b.spec.home)]
    if tier == "sandbox":
        # The namespace bwrap copies at each start holds this session's mounts and no other's.
        first, others = boxes[0], boxes[1:]
        inside = namespace_mount_points(first)
        assert {f"{stage_of(first)}/home", f"{stage_of(first)}/tmp"} <= set(inside)
        assert not [p for p in inside for other in others if p.startswith(stage_of(other))]
    for box in boxes:
        # The server (and root on the host) still reaches each home at the path it asked for.
        assert (box.spec.home / "mine").read_text() == f"{box.spec.label}\n"


async def test_a_home_seeded_by_the_caller_reaches_the_session_and_the_host_view(tmp_path: Path) -> None:
    require_tier("sandbox")
    home = tmp_path / "seeded-home"
    (home / "sub").mkdir(parents=True)
    (home / "sub" / "given.txt").write_text("from the caller\n")
    box = await SessionSandbox.create(SandboxSpec(label="seeded", policy=Policy(), server_id=RUN_SERVER_ID, home=home))
    try:
        status, out = await run(box, "cat ~/sub/given.txt; stat -c %u ~/sub/given.txt; echo back > ~/sub/reply")
        assert status == 0
        assert out.splitlines() == ["from the caller", str(box.uid)]
        assert (home / "sub" / "reply").read_text() == "back\n"
    finally:
        await box.aclose()
    assert not home.is_symlink()


async def test_the_namespace_and_its_mounts_go_with_the_session(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    await run(box, "head -c 1000000 /dev/zero > ~/big")
    assert box._storage.namespace_fd is not None
    namespace = f"mnt:[{os.stat(f'/proc/self/fd/{box._storage.namespace_fd}').st_ino}]"
    await box.aclose()
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") == namespace:
                holders.append(pid)
        except OSError:
            continue
    assert not holders, f"processes still in the closed session's mount namespace: {holders}"
    assert not await anyio.Path(stage_of(box)).exists()


@pytest.fixture(scope="module")
def binary() -> str:
    path = launcher.path()
    if path is None:
        pytest.skip("the launcher cannot be built here")
    return path


def _launch(binary: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, *args], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, pass_fds=pass_fds
    )


async def test_the_launcher_enters_the_namespace_it_is_given_and_closes_it(make_box: BoxFactory, binary: str) -> None:
    box = await make_box("sandbox")
    assert box._storage.namespace_fd is not None
    fd = os.dup(box._storage.namespace_fd)
    try:
        result = _launch(
            binary, f"--mntns-fd={fd}", "--", "sh", "-c", "readlink /proc/self/ns/mnt; ls /proc/self/fd", pass_fds=(fd,)
        )
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    ns_line, *fds = result.stdout.split()
    assert ns_line == os.readlink(f"/proc/self/fd/{box._storage.namespace_fd}")
    assert ns_line != os.readlink("/proc/self/ns/mnt")
    assert sorted(fds) == ["0", "1", "2", "3"], "the namespace descriptor reached the program"  # 3: ls's own dir


def test_the_launcher_refuses_what_is_not_a_mount_namespace(binary: str) -> None:
    read, write = os.pipe()
    net = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        for fd in (read, net):
            result = _launch(binary, f"--mntns-fd={fd}", "--", "/bin/true", pass_fds=(fd,))
            assert result.returncode == 126
            assert "entering the session's mount namespace" in result.stderr, result.stderr
        twice = _launch(binary, f"--mntns-fd={read}", f"--mntns-fd={read}", "--", "/bin/true", pass_fds=(read,))
        assert (twice.returncode, "--mntns-fd given twice" in twice.stderr) == (126, True)
        low = _launch(binary, "--mntns-fd=2", "--", "/bin/true")
        assert (low.returncode, "--mntns-fd: 2 is not an integer from 3" in low.stderr) == (126, True)
    finally:
        for fd in (read, write, net):
            os.close(fd)


@pytest.mark.parametrize("tier", ["sandbox", GVISOR])
async def test_a_hostile_session_cannot_reach_another_sessions_home_by_any_host_path(
    make_box: BoxFactory, tier: str
) -> None:
    victim, attacker = await make_box(tier), await make_box(tier)
    secret = f"victim-secret-{os.getpid()}"
    assert await run(victim, f"echo {secret} > ~/secret; echo {secret} > /tmp/secret") == (0, "")
    assert victim._storage.namespace is not None
    home_fd = victim._storage.namespace.mounts[0].fd
    # Every way the host reaches the victim's files: its home's host path (a symlink to the
    # server's descriptor), that descriptor through /proc, the stage path inside its namespace,
    # and the roots of other processes. (An attacker in tier `none` reads the first two.)
    paths = [
        f"{victim.spec.home}/secret",
        f"/proc/{os.getpid()}/fd/{home_fd}/secret",
        f"{stage_of(victim)}/home/secret",
        f"{stage_of(victim)}/tmp/secret",
    ]
    script = "; ".join(f"cat {path} 2>&1" for path in paths)
    script += "; cat /proc/*/root/home/*/secret /proc/*/root/tmp/secret 2>&1; ls -d /run/agentflow 2>&1; true"
    status, out = await run(attacker, script)
    assert status == 0
    assert secret not in out
    assert out.count("No such file or directory") >= len(paths) + 1, out
