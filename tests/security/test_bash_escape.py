"""A hostile bash session, through the engine, tries to leave its sandbox; every attempt fails.

Each test plays the session's commands (what an LLM steered by a prompt injection would run)
through `Engine.call`, for each isolated tier, and then checks the host from outside: the other
session's files and processes are untouched, no host path changed, nothing survived destroy.
Tiers this machine cannot run skip with the reason (never pass silently).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from backends.policy import Limits, Policy
from tests.security.bash_sandbox import (
    ISOLATED_TIERS,
    Client,
    bash_engine,
    mounts_under,
    pid_alive,
    require_tier,
    run_cgroup_dirs,
    run_pids,
)
from tests.support.polling import eventually
from tests.support.procs import pids_of_uid

pytestmark = pytest.mark.parametrize("tier", ISOLATED_TIERS)


def policy(tier: str, **limits: int) -> Policy:
    return Policy(isolation=tier, network="none", limits=Limits(**limits))


async def test_another_sessions_files_cannot_be_read_or_written(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier)) as engine:
        victim, attacker = Client(engine, "victim"), Client(engine, "attacker")
        v_sid = await victim.create()
        await victim.out("echo top-secret > ~/secret; chmod 644 ~/secret")
        v_home = victim.details(v_sid)["host_home"]
        a_sid = await attacker.create()
        out = await attacker.out(
            f"cat {v_home}/secret; ls {Path(v_home).parent.parent}; echo pwned > {v_home}/secret; "
            f"echo pwned > {v_home}/new; ls /home; cat /home/*/secret",
            a_sid,
        )
        assert "top-secret" not in out
        assert (Path(v_home) / "secret").read_text() == "top-secret\n"
        assert not (Path(v_home) / "new").exists()
        assert (await victim.out("cat ~/secret")).strip() == "top-secret"


async def test_another_sessions_processes_cannot_be_seen_signalled_or_traced(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier)) as engine:
        victim, attacker = Client(engine, "victim"), Client(engine, "attacker")
        v_sid = await victim.create()
        await victim.out("export KEEP=still-here")
        v_shell = victim.details(v_sid)["shell_pid"]
        assert pid_alive(v_shell)
        await attacker.create()
        ptrace = (
            "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
            'print("attach", [libc.ptrace(16, int(p), 0, 0) for p in sys.argv[1:]], ctypes.get_errno())'
        )
        out = await attacker.out(
            f"ls /proc | grep -c '^[0-9]'; kill -9 {v_shell}; kill -STOP {v_shell}; "
            f"python3 -c '{ptrace}' {v_shell} 1; gdb -batch -p {v_shell} 2>&1 | tail -1; "
            "echo done"
        )
        assert "attach [-1, -1]" in out
        assert pid_alive(v_shell)
        assert (await victim.out("echo $KEEP")).strip() == "still-here"


async def test_the_servers_environment_is_out_of_reach(tier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tier(tier)
    secret = f"server-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("AGENTFLOW_TEST_API_KEY", secret)
    async with bash_engine(policy(tier)) as engine:
        attacker = Client(engine, "attacker")
        await attacker.create()
        out = await attacker.out(
            f"env; cat /proc/{os.getpid()}/environ; cat /proc/1/environ; cat /proc/*/environ 2>/dev/null; "
            f"ls -la /proc/{os.getpid()}/ 2>&1 | head -3"
        )
        assert secret not in out
        assert "AGENTFLOW_TEST_API_KEY" not in out


async def test_the_servers_port_and_other_loopback_services_are_unreachable(tier: str) -> None:
    require_tier(tier)
    accepted: list[str] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        accepted.append("connected")
        await stream.aclose()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        async with bash_engine(policy(tier)) as engine:
            attacker = Client(engine, "attacker")
            await attacker.create()
            probe = "(exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null && echo reached-{host} || echo blocked-{host}"
            hosts = ["127.0.0.1", "localhost", "192.0.2.2", "10.0.2.2"]
            script = "; ".join(probe.format(host=h, port=port) for h in hosts)
            out = await attacker.out(f"timeout 10 bash -c '{script}'; ip -o addr 2>/dev/null | wc -l")
        tg.cancel_scope.cancel()
    assert "reached" not in out
    assert accepted == []


async def test_remounting_and_writing_host_paths_fail_and_leave_the_host_unchanged(tier: str) -> None:
    require_tier(tier)
    name = f"af-escape-{secrets.token_hex(6)}"
    targets = [Path("/usr") / name, Path("/var/tmp") / name, Path("/etc") / name, Path("/root") / name]
    async with bash_engine(policy(tier)) as engine:
        attacker = Client(engine, "attacker")
        await attacker.create()
        writes = "; ".join(f"echo x > {t}" for t in targets)
        out = await attacker.out(
            "mount -o remount,rw / 2>&1; mount -o remount,rw,bind / / 2>&1; mount -t tmpfs none /usr 2>&1; "
            f"unshare -rm true 2>&1; {writes}; echo end"
        )
        assert "end" in out
    leaked = [t for t in targets if t.exists()]
    for path in leaked:
        path.unlink()
    assert leaked == [], f"host paths written from the sandbox: {leaked}"


async def test_ld_preload_through_config_runs_nothing_on_the_host(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler to build the preload library")
    witness = Path("/var/tmp") / f"af-preload-{secrets.token_hex(6)}"
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void evil(void) {\n"
        f'  FILE *f = fopen("{witness}", "a"); if (f) {{ fprintf(f, "ran\\n"); fclose(f); }}\n'
        "}\n"
    )
    library = tmp_path / "evil.so"
    await anyio.run_process(["cc", "-shared", "-fPIC", "-o", str(library), str(source)])
    await anyio.Path(tmp_path).chmod(0o755)
    await anyio.Path(library).chmod(0o755)
    try:
        async with bash_engine(policy(tier)) as engine:
            attacker = Client(engine, "attacker")
            sid = await attacker.create({"env": {"LD_PRELOAD": str(library)}})
            await attacker.out("echo first", sid)
            # The session builds its own library, then asks for it (by its host path) on reinitialize.
            await attacker.out(
                f"printf '%s' '{source.read_text()}' > ~/own.c && cc -shared -fPIC -o ~/own.so ~/own.c", sid
            )
            home = attacker.details(sid)["host_home"]
            again = await attacker.call(
                "reinitialize",
                {"session_id": sid, "config": {"env": {"LD_PRELOAD": f"{library}:{home}/own.so"}}},
            )
            assert again.ok, again.message
            await attacker.out("echo second", str(again.data["session_id"]))
        assert not witness.exists(), "a host-side process loaded the session's LD_PRELOAD"
    finally:
        witness.unlink(missing_ok=True)


async def test_policy_cannot_be_loosened_through_config(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier, memory_mb=256)) as engine:
        attacker = Client(engine, "attacker")
        loosen: list[dict[str, Any]] = [
            {"isolation": "none"},
            {"network": "host"},
            {"limits": {"memory_mb": 4096}},
            {"limits": {"pids": 100_000}},
        ]
        if tier == "gvisor":
            loosen.append({"isolation": "sandbox"})
        for request in loosen:
            refused = await attacker.call("create_session", {"resource": "bash", "config": request})
            assert refused.code == 1006, (request, refused.message)
            assert next(iter(request)) in refused.message
        sid = await attacker.create()
        again = await attacker.call("reinitialize", {"session_id": sid, "config": {"isolation": "none"}})
        assert again.code == 1006
        assert "isolation" in again.message
        assert attacker.details(sid)["tier"] == tier


async def test_processes_that_drop_their_tags_and_double_fork_die_with_the_session(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier)) as engine:
        attacker = Client(engine, "attacker")
        sid = await attacker.create()
        label, uid = attacker.label(sid), attacker.details(sid)["uid"]
        home = Path(attacker.details(sid)["host_home"])
        await attacker.out(
            "env -i setsid nohup sleep 1000 >/dev/null 2>&1 & "
            "( ( env -u AGENTFLOW_SESSION -u AGENTFLOW_COMMAND setsid sleep 1001 </dev/null >/dev/null 2>&1 & ) & ); "
            "disown -a; echo started",
            sid,
        )
        # Both sleepers run (seen from inside, which is all gVisor shows), whatever they dropped.
        count = "pgrep -xc sleep || true"
        await eventually(lambda: _count_is(attacker, sid, count, 2), 20)
        members = run_pids(label)
        assert members
        destroyed = await attacker.call("destroy_session", {"session_id": sid})
        assert destroyed.ok, destroyed.message
        # Killed before the destroy answered; reaping, cgroup removal and unmounting finish
        # in the background within a bounded moment.
        await eventually(lambda: not [pid for pid in members if pid_alive(pid)], 10)
        await eventually(lambda: run_cgroup_dirs(label) == [] and pids_of_uid(uid) == [], 10)
        await eventually(lambda: mounts_under(home) == [], 10)


async def _count_is(client: Client, sid: str, command: str, expected: int) -> bool:
    return (await client.out(command, sid)).strip() == str(expected)


#: Forks until the kernel refuses; the children exit once the parent does (EOF on the pipe).
FORK_BOMB = """
import os, sys
r, w = os.pipe()
n = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        sys.exit(f"fork failed after {n}: {exc.strerror}")
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    n += 1
"""


async def test_process_limit_is_enforced_and_named(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier, pids=40)) as engine:
        attacker = Client(engine, "attacker")
        sid = await attacker.create()
        await attacker.out(f"export KEEP=ok; cat > bomb.py <<'EOF'\n{FORK_BOMB}\nEOF", sid)
        hit = await attacker.bash("python3 bomb.py", sid, limit=60)
        assert hit.code == 2001, hit.message
        assert "process limit (40" in hit.message
        if "fork failed after" in hit.data["stderr"]:  # gVisor may stop the bomb another way
            forked = int(hit.data["stderr"].split("fork failed after")[1].split(":")[0])
            assert forked < 40
        # The bomb's children exit once it does; gVisor may take a moment to reap them.
        after = await attacker.bash("echo $KEEP", sid)
        with anyio.fail_after(60):
            while not after.ok and tier == "gvisor":
                await anyio.sleep(0.2)
                after = await attacker.bash("echo $KEEP", sid)
        assert after.ok, after.message
        if tier == "sandbox":
            # In gVisor the shell sometimes exits after its children hit the limit; a fresh one starts.
            assert after.data["stdout"] == "ok\n"


async def test_memory_limit_kills_the_hog_and_the_session_stays_usable(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier, memory_mb=96)) as engine:
        attacker = Client(engine, "attacker")
        sid = await attacker.create()
        await attacker.out("export KEEP=ok", sid)
        hog = "x = bytearray(400 << 20); x[::4096] = b'y' * len(x[::4096])"  # every page really used
        hit = await attacker.bash(f'python3 -c "{hog}"', sid, limit=60)
        assert hit.code == 2001, hit.message
        assert "memory limit (96 MB" in hit.message
        after = await attacker.bash("echo $KEEP", sid)
        assert after.ok, after.message
        if tier == "sandbox":
            # The kernel kills the largest process: the hog, not the shell.
            assert after.data["stdout"] == "ok\n"
            assert not after.data["shell_restarted"]


async def test_disk_limit_gives_enospc_named_and_the_session_stays_usable(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier, disk_mb=8, memory_mb=128)) as engine:
        attacker = Client(engine, "attacker")
        sid = await attacker.create()
        for target in ("~/big", "/tmp/big"):
            hit = await attacker.bash(f"head -c 32M /dev/zero > {target}", sid, limit=60)
            assert hit.code == 2001, hit.message
            assert "disk limit (8 MB" in hit.message
            await attacker.out(f"rm -f {target}", sid)
        assert (await attacker.out("echo ok > ~/small && cat ~/small", sid)).strip() == "ok"


async def test_uids_are_unprivileged_and_distinct_per_session(tier: str) -> None:
    require_tier(tier)
    async with bash_engine(policy(tier)) as engine:
        one, two = Client(engine, "one"), Client(engine, "two")
        sid_one, sid_two = await one.create(), await two.create()
        uid_one = int((await one.out("id -u", sid_one)).strip())
        uid_two = int((await two.out("id -u", sid_two)).strip())
        assert uid_one != 0
        assert uid_two != 0
        assert uid_one != uid_two
        assert os.getuid() not in (uid_one, uid_two)
        assert {one.details(sid_one)["uid"], two.details(sid_two)["uid"]} == {uid_one, uid_two}
        if tier == "sandbox":
            # The host sees the shell under the same uid (a user namespace maps nothing more).
            assert os.stat(f"/proc/{one.details(sid_one)['shell_pid']}").st_uid == uid_one
