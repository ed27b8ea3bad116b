"""A session sandbox runs real programs in each tier, with the environment, home and limits asked for."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from backends.policy import Mount, Policy
from backends.sandbox import Bind, SandboxSpec, SessionSandbox, bwrap, cgroups, mechanisms
from backends.sandbox.spec import HOME_INSIDE
from session.errors import ConfigurationError, ParameterError
from tests.sandbox.helpers import (
    RUN_SERVER_ID,
    SANDBOXED,
    TIERS,
    BoxFactory,
    has_cap_sys_resource,
    host_exists,
    pid_alive,
    read_proc,
    run,
    run_cgroup_dirs,
    start_ready,
    thread_niceness,
)
from tests.support.procs import held_mount_namespaces


@pytest.mark.parametrize("tier", TIERS)
async def test_environment_home_and_cwd_are_what_was_asked(make_box: BoxFactory, tier: str) -> None:
    os.environ["AGENTFLOW_TEST_SERVER_SECRET"] = "server-only"
    try:
        box = await make_box(tier)
        status, out = await run(box, 'env | sort; echo "cwd=$(pwd)"; echo hi > ~/f; cat ~/f', env={"MY_KEY": "v 1"})
    finally:
        del os.environ["AGENTFLOW_TEST_SERVER_SECRET"]
    assert status == 0, out
    assert "MY_KEY=v 1" in out
    assert "server-only" not in out
    assert f"cwd={box.home_path}" in out
    assert out.rstrip().endswith("hi")
    assert (Path(box.spec.home) / "f").read_text() == "hi\n"


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_shell_basics_work(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier)
    script = (
        "set -e; ls / >/dev/null; ls -la ~ >/dev/null; stat / >/dev/null; echo one > /tmp/a; cat /tmp/a >> ~/b; "
        "cp ~/b ~/c; mv ~/c ~/d; find ~ -name d | wc -l; python3 -c 'print(6*7)'; echo done"
    )
    status, out = await run(box, script)
    assert status == 0, out
    assert out.split() == ["1", "42", "done"]


@pytest.mark.parametrize("tier", TIERS)
async def test_describe_names_tier_uid_and_limits(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier, pids=100, memory_mb=300)
    info = box.describe()
    assert info["tier"] == tier
    assert info["uid"] == box.uid
    assert info["limits"]["pids"] == 100
    if mechanisms()["cgroup"]["version"] == 1:
        # gVisor's own Sentry and gofer threads need room beyond the session's 100 (enforced inside).
        overhead = 256 if tier == "gvisor" else 0
        assert info["cgroup"]["limits_in_force"]["pids.max"] == str(100 + overhead)
        assert info["cgroup"]["limits_in_force"]["memory.limit_in_bytes"] == str(300 << 20)
        assert all(RUN_SERVER_ID in path for path in info["cgroup"]["paths"].values())


def test_mechanisms_report_what_the_host_has() -> None:
    mech = mechanisms()
    assert set(mech["tiers"]) == {"none", "sandbox", "gvisor"}
    assert "ptrace" in mech["seccomp"]["denied_syscalls"]
    assert mech["networks"]["internet"].startswith("unavailable")
    assert mech["limits_mechanism"]


@pytest.mark.parametrize("tier", TIERS)
async def test_internet_is_refused_not_downgraded(make_box: BoxFactory, tier: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        await make_box(tier, network="internet")
    assert err.value.code == 5001
    assert "internet" in err.value.message


async def test_bad_environment_and_spec_are_parameter_errors(make_box: BoxFactory, tmp_path: Path) -> None:
    box = await make_box("sandbox")
    for env in ({"A=B": "x"}, {"--clearenv": "x"}, {"A": "x\0y"}):
        with pytest.raises(ParameterError):
            await box.spawn(["/bin/true"], env=env)
    for bad in ({"label": "../x"}, {"server_id": "nopid"}, {"hostname": "a b"}):
        fields = {"label": "ok", "server_id": RUN_SERVER_ID, "hostname": "h", **bad}
        with pytest.raises(ParameterError):
            SandboxSpec(policy=Policy(), home=tmp_path, **fields)  # type: ignore[arg-type]
    with pytest.raises(ParameterError):
        Bind(tmp_path, "/a/../etc")


async def test_aclose_removes_cgroups_mounts_and_is_idempotent(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    status, _ = await run(box, "echo from-inside > ~/made-inside")
    assert status == 0
    # The host path of the home reaches the session's home tmpfs, which is mounted only in the
    # session's own mount namespace (see tests/sandbox/test_mount_namespace.py).
    host_home = anyio.Path(box.spec.home)
    assert await host_home.is_symlink()
    assert await (host_home / "made-inside").read_text() == "from-inside\n"
    namespace = os.stat(f"/proc/self/fd/{box._storage.namespace_fd}").st_ino
    await box.aclose()
    await box.aclose()
    assert not await host_home.is_symlink()  # an empty directory again, as the caller made it
    assert await host_home.is_dir()
    assert not [name async for name in host_home.iterdir()]
    assert f"mnt:[{namespace}]" not in held_mount_namespaces(), "the server still holds the session's mount namespace"
    assert not [p for p in run_cgroup_dirs() for _ in p.glob(box.spec.label)]
    with pytest.raises(RuntimeError):
        await box.spawn(["/bin/true"], env={})


async def test_inner_pid_is_the_program_and_can_be_signalled(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    process = await box.spawn(
        ["/bin/bash", "-c", "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.05; done"],
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    with anyio.fail_after(30):
        assert b"ready" in await process.stdout.receive()
    inner = await box.wait_inner_pid(process)
    assert inner is not None
    assert inner != process.pid
    assert read_proc(inner, "cmdline").startswith("/bin/bash")
    assert os.stat(f"/proc/{inner}").st_uid == box.uid
    protected = await box.protect(process)
    # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which some hosts withhold even from root.
    assert protected == has_cap_sys_resource()
    if protected:
        assert read_proc(process.pid, "oom_score_adj").strip() == "-1000"
    assert read_proc(inner, "oom_score_adj").strip() == "0"
    os.kill(inner, signal.SIGINT)
    with anyio.fail_after(30):
        assert b"got-int" in await process.stdout.receive()
        assert await process.wait() == 3


async def test_pass_fds_reach_the_program(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    read_end, write_end = os.pipe()
    try:
        status, out = await run(box, f"echo through-fd >&{write_end}", pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        assert status == 0, out
        assert os.read(read_end, 100) == b"through-fd\n"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_binds_are_read_only_unless_writable(make_box: BoxFactory, tmp_path: Path, tier: str) -> None:
    shared_ro = tmp_path / "ro"
    shared_rw = tmp_path / "rw"
    for directory in (shared_ro, shared_rw):
        directory.mkdir()
        (directory / "in").write_text("host\n")
    shared_rw.chmod(0o777)
    binds = (Bind(shared_ro, "/data/ro"), Bind(shared_rw, "/data/rw", writable=True))
    box = await make_box(tier, binds=binds)
    status, out = await run(box, "cat /data/ro/in; echo x > /data/ro/new; echo y > /data/rw/new && echo wrote")
    assert "host" in out
    assert "wrote" in out
    assert not (shared_ro / "new").exists()
    assert (shared_rw / "new").read_text() == "y\n"
    assert status == 0, out


async def test_operator_mounts_from_the_policy_are_bound(tmp_path: Path) -> None:
    granted = tmp_path / "granted"
    granted.mkdir()
    (granted / "data").write_text("operator\n")
    home = tmp_path / "home"
    home.mkdir()
    policy = Policy(mounts=[Mount(host=str(granted), path="/srv/data", mode="ro")])
    box = await SessionSandbox.create(SandboxSpec(label="mounts", policy=policy, server_id=RUN_SERVER_ID, home=home))
    try:
        _status, out = await run(box, "cat /srv/data/data; echo x > /srv/data/new; echo end")
    finally:
        await box.aclose()
    assert "operator" in out
    assert out.rstrip().endswith("end")
    assert not host_exists(granted / "new")


async def test_home_inside_is_fixed_and_private(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    status, out = await run(box, 'echo "$HOME"; stat -c "%a %u" ~ /tmp')
    assert status == 0, out
    assert out.split() == [HOME_INSIDE, "700", str(box.uid), "700", str(box.uid)]


def host_passwd() -> bytes:
    return Path("/etc/passwd").read_bytes()


@pytest.mark.parametrize("tier", SANDBOXED)
async def test_the_session_user_has_a_name_and_lookups_stop_at_etc_passwd(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier)
    before = host_passwd()
    status, out = await run(
        box,
        "whoami; id -un; id -gn; getent passwd $(id -u); grep -c '^root:' /etc/passwd; "
        # bash looked its uid up at start: found in /etc/passwd, no NSS module was loaded for it.
        "grep -c libnss_systemd /proc/$$/maps; echo 'evil:x:0:0::/:/bin/bash' >> /etc/passwd && echo written",
    )
    lines = out.splitlines()
    assert lines[:4] == ["user", "user", "user", f"user:x:{box.uid}:{box.uid}::{HOME_INSIDE}:/bin/bash"], out
    assert lines[4:6] == ["1", "0"], out  # the host's entries stay; no libnss_systemd in the shell
    assert "written" not in out
    assert "Read-only file system" in out or "Permission denied" in out  # bwrap / gVisor
    assert status != 0
    assert host_passwd() == before


def test_identity_files_add_the_user_only_for_a_uid_the_host_does_not_know() -> None:
    assert bwrap.identity_files(os.geteuid()) == {}  # root (or the server's own uid): known already
    files = bwrap.identity_files(2_000_000 - 1)
    passwd = files["/etc/passwd"].decode().splitlines()
    assert passwd[-1] == f"user:x:1999999:1999999::{HOME_INSIDE}:/bin/bash"
    assert [line for line in passwd if line.startswith("user:")] == [passwd[-1]]
    assert files["/etc/group"].decode().splitlines()[-1] == "user:x:1999999:"


async def test_two_processes_of_one_session_share_home_and_tmp(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    assert (await run(box, "echo a > /tmp/shared; echo b > ~/shared"))[0] == 0
    status, out = await run(box, "cat /tmp/shared ~/shared")
    assert (status, out.split()) == (0, ["a", "b"])


async def test_a_duplicate_label_is_refused_without_harming_the_first(make_box: BoxFactory, tmp_path: Path) -> None:
    first = await make_box("sandbox")
    process = await first.spawn(["/bin/sleep", "300"], env={})
    home = tmp_path / "dup" / "home"
    home.mkdir(parents=True)
    spec = SandboxSpec(label=first.spec.label, policy=Policy(), server_id=RUN_SERVER_ID, home=home)
    with pytest.raises(ConfigurationError):
        await SessionSandbox.create(spec)
    assert process.returncode is None
    assert process.pid in first.pids()
    assert (await run(first, "echo still-here"))[1].strip() == "still-here"


async def test_create_failure_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    spec = SandboxSpec(label="fail", policy=Policy(network="internet"), server_id=RUN_SERVER_ID, home=home)
    with pytest.raises(ConfigurationError):
        await SessionSandbox.create(spec)
    assert not [p for p in run_cgroup_dirs() for _ in p.glob("fail")]


async def test_processes_die_with_the_sandbox_even_after_setsid(make_box: BoxFactory) -> None:
    box = await make_box("none")
    status, out = await run(box, "setsid sleep 300 >/dev/null 2>&1 & echo $!")
    assert status == 0, out
    orphan = int(out.split()[-1])
    assert pid_alive(orphan)
    assert orphan in box.pids()
    await box.aclose()
    assert not pid_alive(orphan)


@pytest.mark.parametrize("tier", TIERS)
async def test_spawned_processes_start_with_the_specs_niceness(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier, nice=7)
    if tier != "gvisor":  # gVisor's own kernel keeps its own niceness per task: the host's is checked below
        # awk reads its own stat line: what the program itself runs with, inside the sandbox.
        status, out = await run(box, "awk '{print $19}' /proc/self/stat")
        assert (status, out.split()) == (0, ["7"]), out
    process = await start_ready(box, "echo ready; exec sleep 300")
    members = box.pids()
    assert process.pid in members
    # Every host-side thread of the session: wrappers, the program, gVisor's Sentry and gofer.
    assert set(thread_niceness(members).values()) == {7}


@pytest.mark.parametrize("tier", TIERS)
async def test_renice_moves_live_members_their_children_and_later_spawns(make_box: BoxFactory, tier: str) -> None:
    box = await make_box(tier, nice=12)
    # The forked sleeps are in the session (and inherit the niceness) from their fork on.
    await start_ready(box, "sleep 300 & sleep 301 & echo ready; wait")
    before = box.pids()
    assert len(before) >= 3
    assert set(thread_niceness(before).values()) == {12}
    box.renice(3)  # lowering a niceness: root only (CAP_SYS_NICE)
    expected = 3 if os.geteuid() == 0 else 12
    assert set(thread_niceness(box.pids()).values()) == {expected}
    later = await start_ready(box, "echo ready; exec sleep 302")
    assert set(thread_niceness([later.pid]).values()) == {expected}
    assert set(thread_niceness(box.pids()).values()) == {expected}
    box.renice(15)  # raising one needs no privilege
    assert set(thread_niceness(box.pids()).values()) == {15}
    with pytest.raises(ParameterError):
        box.renice(20)


def _cpu_weight(box: SessionSandbox) -> tuple[str, str] | None:
    """(file, value) of the session's cpu cgroup weight, None without a cpu controller."""
    paths = box.describe().get("cgroup", {}).get("paths", {})
    if "cpu" not in paths:
        return None
    for name in ("cpu.weight", "cpu.shares"):
        weight = Path(paths["cpu"]) / name
        if weight.exists():
            return name, weight.read_text().strip()
    return None


async def test_the_session_cgroup_weighs_like_its_niceness(make_box: BoxFactory) -> None:
    # A niceness only ranks tasks within their own cgroup; each session has its own, so a
    # low-priority session (a pool member) must also weigh little against its siblings.
    box = await make_box("sandbox", nice=19)
    weight = _cpu_weight(box)
    if weight is None:
        pytest.skip("no cpu cgroup controller here")
    lowest = {"cpu.shares": str(cgroups.NICE_TO_WEIGHT[-1]), "cpu.weight": "1"}
    assert weight == (weight[0], lowest[weight[0]])
    box.renice(0)
    assert _cpu_weight(box) == (weight[0], {"cpu.shares": "1024", "cpu.weight": "100"}[weight[0]])
    box.renice(10)
    assert _cpu_weight(box) == (weight[0], {"cpu.shares": "110", "cpu.weight": "11"}[weight[0]])


async def test_a_zero_niceness_leaves_the_servers_own(make_box: BoxFactory) -> None:
    box = await make_box("sandbox")
    status, out = await run(box, "awk '{print $19}' /proc/self/stat")
    assert (status, out.split()) == (0, [str(os.getpriority(os.PRIO_PROCESS, 0))]), out
    with pytest.raises(ParameterError):
        SandboxSpec(label="n", policy=Policy(), server_id=RUN_SERVER_ID, home=box.spec.home, nice=-21)
