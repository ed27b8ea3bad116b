"""A hostile vm session tries to reach past its desktop; every attempt fails and nothing outlives it.

The hostile code is whatever a session launches on its own desktop: a shell script that
probes another session's display (by name, by socket path, with and without that
desktop's cookie file), the server's environment, another session's cookie, and a
process that tries to survive the session. Each test runs in the default tier
(`sandbox`); the machine must provide it, or the test skips with the reason.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from Xlib import error as xerror

from backends.base import SessionSetup
from backends.policy import Policy
from backends.sandbox import Bind, SandboxSpec, SessionSandbox
from backends.vm.xconnect import XEndpoint, open_display
from backends.vm.xgrab import GrabError, RootGrabber
from session.errors import BackendError, ConfigurationError
from tests.backends.vm_harness import (
    RUN_SERVER_ID,
    Desktops,
    Session,
    alive,
    desktops,
    file_text,
    names,
    needs_desktop,
    until,
)

pytestmark = [pytest.mark.slow, needs_desktop]

FAKE_KEY = "sk-agentflow-vmtest-not-a-real-key"


@pytest.fixture
async def vm() -> AsyncIterator[Desktops]:
    async for pool in desktops():
        yield pool


async def _run_in(session: Session, script: str, name: str) -> str:
    """Run `sh -c script` on the session's desktop; its output, written to a file in its home."""
    out = f"$HOME/{name}"
    wrapped = f'( {script} ) > {out}.part 2>&1; echo "exit=$?" >> {out}.part; mv {out}.part {out}'
    await session.call("launch", command=["sh", "-c", wrapped], wait_for_window=False)
    return await file_text(session.home / name, "\n")


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


async def test_an_app_cannot_reach_another_sessions_display(vm: Desktops) -> None:
    victim = await vm.start({"window_manager": "none"})
    attacker = await vm.start({"window_manager": "none"})
    target = victim.desktop.export()
    socket_path = Path(target["x11_socket_dir"], f"X{victim.desktop.number}")
    script = "; ".join(
        [
            # By display name: nothing of the victim's listens in the attacker's /tmp/.X11-unix or abstract space.
            f"xdpyinfo -display {target['display']} >/dev/null 2>&1 && echo REACHED-BY-NAME",
            # With the victim's cookie file, by name and by the socket's host path.
            f"XAUTHORITY={shlex.quote(target['xauthority'])} xdpyinfo -display {target['display']} >/dev/null 2>&1"
            " && echo REACHED-WITH-COOKIE",
            f"ls {shlex.quote(str(socket_path))} >/dev/null 2>&1 && echo SEES-SOCKET",
            f"cat {shlex.quote(target['xauthority'])} >/dev/null 2>&1 && echo READS-COOKIE",
            "echo probed",
        ]
    )
    output = await _run_in(attacker, script, "probe.txt")
    assert "probed" in output
    for marker in ("REACHED-BY-NAME", "REACHED-WITH-COOKIE", "SEES-SOCKET", "READS-COOKIE"):
        assert marker not in output, output
    # Its own display works the same way, so the probe itself is sound.
    own = await _run_in(attacker, "xdpyinfo >/dev/null && echo OWN-OK", "own.txt")
    assert "OWN-OK" in own, own


async def test_a_linked_sandbox_reaches_the_desktop_only_through_what_export_names(vm: Desktops) -> None:
    """What a browser session linked to this desktop gets: its socket directory and cookie, bound read-only."""
    desktop = (await vm.start({"window_manager": "none"})).desktop
    exported = desktop.export()
    home = vm.root / "linked-home"
    home.mkdir()

    async def probe(*binds: Bind, authority: str) -> tuple[int, str]:
        spec = SandboxSpec(label="linked", policy=Policy(), server_id=RUN_SERVER_ID, home=home, binds=binds)
        box = await SessionSandbox.create(spec)
        try:
            assert box.uid != desktop.runner.sandbox.uid
            env = {"PATH": "/usr/bin:/bin", "HOME": box.home_path, "DISPLAY": exported["display"]}
            process = await box.spawn(
                ["xdpyinfo"], env={**env, "XAUTHORITY": authority}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            with anyio.fail_after(30):
                assert process.stdout is not None
                output = b"".join([chunk async for chunk in process.stdout])
                return await process.wait(), output.decode(errors="replace")
        finally:
            await box.aclose()

    socket_dir = Bind(Path(exported["x11_socket_dir"]), "/tmp/.X11-unix")
    cookie_dir = Bind(Path(exported["xauthority"]).parent, "/tmp/.X11-auth")
    status, output = await probe(socket_dir, cookie_dir, authority="/tmp/.X11-auth/Xauthority")
    assert status == 0, output
    assert f"name of display:    {exported['display']}" in output
    status, output = await probe(socket_dir, authority="/dev/null")
    assert status != 0
    assert "Authorization required" in output or "unable to open display" in output


async def test_a_desktop_refuses_the_wrong_cookie_even_at_its_socket(vm: Desktops) -> None:
    """Were a socket ever reachable, the cookie still decides: another desktop's is refused."""
    victim = await vm.start({"window_manager": "none"})
    other = await vm.start({"window_manager": "none"})
    wrong = XEndpoint(victim.desktop.display_name, victim.desktop.endpoint.socket_path, other.desktop.cookie)
    with pytest.raises(xerror.DisplayConnectionError):
        await anyio.to_thread.run_sync(open_display, wrong)
    with pytest.raises(GrabError, match="refused the connection"):
        await anyio.to_thread.run_sync(RootGrabber, wrong)
    right = await anyio.to_thread.run_sync(open_display, victim.desktop.endpoint)
    right.close()


async def test_an_app_cannot_read_the_servers_environment(vm: Desktops, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    session = await vm.start({"window_manager": "none"})
    server = os.getpid()
    output = await _run_in(
        session,
        f"env; cat /proc/{server}/environ; cat /proc/1/environ; tr '\\0' '\\n' < /proc/$PPID/environ",
        "env.txt",
    )
    assert FAKE_KEY not in output
    assert "OPENAI_API_KEY" not in output
    # `vm_launch` of `env` shows the app's own variables only (and at most 200 characters of them).
    shown = await session.call("launch", command="env", timeout=20)
    assert shown.exit_code == 0
    assert shown.output is not None
    assert "=" in shown.output
    assert "OPENAI_API_KEY" not in shown.output
    assert len(shown.output) <= 200
    # A failing launch's error never carries it either, nor more than a bounded prefix of output.
    with pytest.raises(BackendError) as failed:
        await session.call("launch", command=["sh", "-c", "env; exit 3"])
    assert FAKE_KEY not in failed.value.message
    assert len(failed.value.message) < 400


async def test_desktop_processes_run_as_the_sessions_own_unprivileged_uid(vm: Desktops) -> None:
    one = await vm.start({"startup": [["xterm"]]})
    two = await vm.start({"window_manager": "none"})
    expected = {"Xvfb", "openbox", "xterm"}
    await until(lambda: expected <= names(one.desktop.pids()), what=f"{expected} in the sandbox")
    uid_one = one.desktop.runner.sandbox.uid
    uid_two = two.desktop.runner.sandbox.uid
    assert uid_one not in (0, os.getuid())
    assert uid_two not in (0, os.getuid(), uid_one)
    for pid in one.desktop.pids():
        if names([pid]) & expected:
            assert _uid(pid) == uid_one, (pid, names([pid]))
    # The socket and cookie directories are the session's (no one else may add or swap files),
    # inside a scratch directory only the server may walk: only sandboxes they are bound into reach them.
    for directory in (one.desktop.paths.x11_dir, one.desktop.paths.xauth_dir):
        info = await anyio.Path(directory).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (uid_one, 0o711)
    scratch = await anyio.Path(one.setup.scratch).stat()
    assert (scratch.st_uid, scratch.st_mode & 0o077) == (0, 0)


async def test_nothing_outlives_the_session(vm: Desktops) -> None:
    session = await vm.start({"startup": [["xterm"]]})
    # A process that leaves its group, drops every variable and double-forks.
    await session.call(
        "launch",
        command=["sh", "-c", "setsid sh -c 'env -i sleep 600 & env -i sleep 601 &' & exec env -i sleep 602"],
        wait_for_window=False,
    )
    desktop = session.desktop
    await until(lambda: {"sleep", "Xvfb", "xterm"} <= names(desktop.pids()), what="the session's processes")
    pids = desktop.pids()
    uid = desktop.runner.sandbox.uid
    await session.cleanup()
    assert not [pid for pid in pids if alive(pid)]
    assert desktop.pids() == []
    left = [int(e) for e in os.listdir("/proc") if e.isdigit() and _uid(int(e)) == uid and alive(int(e))]
    assert not left, [(p, names([p])) for p in left]
    assert not await anyio.Path(desktop.paths.authority).exists()
    assert desktop.number not in vm.backend.displays.live


async def test_endless_output_fills_the_sessions_quota_not_the_hosts_disk(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"}, disk_mb=16)
    # 100 MB of output against a 16 MB quota: the writes fail (ENOSPC), so the program exits 1.
    with pytest.raises(BackendError, match="exited with code 1") as flood:
        await session.call("launch", command=["sh", "-c", "head -c 100000000 /dev/zero | tr '\\0' x; echo"])
    assert len(flood.value.message) < 400
    home = await anyio.to_thread.run_sync(os.statvfs, session.home)
    assert (home.f_blocks - home.f_bfree) * home.f_frsize <= 17 << 20  # the app hit its own 16 MB cap
    assert not [p.name for p in await anyio.to_thread.run_sync(lambda: list(session.home.iterdir()))]


async def test_an_app_over_the_memory_limit_is_killed_and_the_error_names_the_limit(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"}, memory_mb=160)
    hog = ["python3", "-c", "b = bytearray(600 << 20); print(len(b))"]
    with pytest.raises(BackendError, match="memory") as killed:
        await session.call("launch", command=hog, timeout=60)
    assert "exited with code" in killed.value.message
    assert "memory_oom_kills" in killed.value.message
    # The desktop itself survives its app.
    assert await session.backend.health(session.state) is None
    shot, _ = await session.screenshot()
    assert shot.width == 1280


async def test_gvisor_is_refused_with_the_reason(vm: Desktops) -> None:
    backend = vm.backend
    scratch = vm.root / "gv"
    scratch.mkdir()
    setup = SessionSetup(
        worker_id="w",
        session_id="not-logged",
        label="gv",
        resource="vm",
        config=backend.session_config({}),
        policy=Policy(isolation="gvisor"),
        scratch=scratch,
    )
    with pytest.raises(ConfigurationError, match="gvisor") as refused:
        await backend.initialize(setup)
    assert refused.value.code == 5001
