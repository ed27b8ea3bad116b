"""The session launcher (backends/sandbox/launcher.c) on its own: argv, errors, each step, the build cache."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.sandbox import launcher
from tests.sandbox.helpers import inheritable_capability

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler: the launcher cannot be built"
)
HOST_ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def binary() -> str:
    path = launcher.path()
    assert path is not None, "the launcher failed to build with the compiler at hand"
    return path


def launch(
    binary: str, *args: str, pass_fds: tuple[int, ...] = (), restore_signals: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, *args],
        env=HOST_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        pass_fds=pass_fds,
        restore_signals=restore_signals,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "missing -- before the program"),
        (("/bin/true",), "unknown option /bin/true"),
        (("--",), "no program after --"),
        (("--bogus", "--", "/bin/true"), "unknown option --bogus"),
        (("--nice", "--", "/bin/true"), "--nice: -- is not an integer"),
        (("--nice",), "--nice needs a value"),
        (("--nice=20", "--", "/bin/true"), "--nice: 20 is not an integer from -20 to 19"),
        (("--nice=1x", "--", "/bin/true"), "--nice: 1x is not an integer"),
        (("--nice=", "--", "/bin/true"), "--nice needs a value"),
        (("--nice=1", "--nice=2", "--", "/bin/true"), "--nice given twice"),
        (("--uid=0", "--", "/bin/true"), "--uid: 0 is not an integer from 1"),
        (("--uid=4294967295", "--", "/bin/true"), "--uid: 4294967295 is not an integer"),
        (("--uid=-5", "--", "/bin/true"), "--uid: -5 is not an integer"),
        (("--cgroup-fd=1", "--", "/bin/true"), "--cgroup-fd: 1 is not an integer from 3"),
        (("--cgroup-fd=99999999999", "--", "/bin/true"), "--cgroup-fd: 99999999999 is not an integer"),
        (("--cgroup-fd=200", "--", "/bin/true"), "--cgroup-fd 200: Bad file descriptor"),
        (("--nicer=1", "--", "/bin/true"), "unknown option --nicer=1"),
    ],
)
def test_bad_arguments_exit_126_with_the_reason(binary: str, args: tuple[str, ...], message: str) -> None:
    result = launch(binary, *args)
    assert result.returncode == 126
    assert result.stdout == ""
    assert result.stderr.startswith("agentflow-launch: ")
    assert message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_a_missing_program_exits_127_and_an_unrunnable_one_126(binary: str, tmp_path: Path) -> None:
    missing = launch(binary, "--", "no-such-program-here")
    assert (missing.returncode, missing.stderr) == (
        127,
        "agentflow-launch: no-such-program-here: No such file or directory\n",
    )
    not_executable = tmp_path / "data"
    not_executable.write_text("#!/bin/sh\n")
    denied = launch(binary, "--", str(not_executable))
    assert denied.returncode == 126
    assert "Permission denied" in denied.stderr


def test_the_program_is_found_in_path_and_gets_its_arguments(binary: str) -> None:
    result = launch(binary, "--", "printf", "%s|", "a b", "--", "--nice=3")
    assert (result.returncode, result.stdout) == (0, "a b|--|--nice=3|")


def test_a_descriptor_that_is_not_a_cgroup_file_is_refused(binary: str, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "cgroup.procs", os.O_WRONLY | os.O_CREAT)
    try:
        result = launch(binary, f"--cgroup-fd={fd}", "--", "/bin/true", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert result.returncode == 126
    assert f"--cgroup-fd {fd} is not a file of a cgroup filesystem" in result.stderr


def test_niceness_is_set_before_the_program_starts(binary: str) -> None:
    result = launch(binary, "--nice=9", "--", "awk", "{print $19}", "/proc/self/stat")
    assert (result.returncode, result.stdout.strip()) == (0, "9")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_the_uid_switch_leaves_no_group_and_no_capability_even_ones_the_server_passes_on(binary: str) -> None:
    with inheritable_capability():
        # What the server thread holds, for contrast: without the launcher it would be inherited.
        held = launch(binary, "--", "grep", "^CapInh", "/proc/self/status").stdout.split()[1]
        result = launch(binary, "--uid=65534", "--", "cat", "/proc/self/status")
    assert held == "0000000000000400"
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["Uid"].split() == ["65534"] * 4
    assert fields["Gid"].split() == ["65534"] * 4
    assert fields["Groups"].strip() == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap].strip() == "0000000000000000", cap


def test_signals_start_at_their_defaults(binary: str) -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        inherited = launch(binary, "--", "grep", "^Sig[IB]", "/proc/self/status", restore_signals=False)
        direct = subprocess.run(["grep", "^Sig[IB]", "/proc/self/status"], capture_output=True, text=True, check=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, previous)
    assert direct.stdout.split()[1:4:2] != ["0000000000000000", "0000000000000000"]  # the server's state passes on
    assert inherited.stdout.split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000"]


# -- building -------------------------------------------------------------------------


def test_a_build_is_cached_by_source_hash_and_reused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = launcher.build(root)
    inode = first.stat().st_ino
    assert first.parent.parent == root
    assert first.stat().st_mode & 0o777 == 0o755
    again = launcher.build(root)
    assert again == first
    assert again.stat().st_ino == inode  # not rebuilt
    assert launch(str(first), "--", "/bin/true").returncode == 0
    assert [p.name for p in first.parent.iterdir()] == [launcher.NAME]  # no partial files left


def test_concurrent_builds_each_get_a_working_launcher(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with ThreadPoolExecutor(3) as pool:
        built = list(pool.map(lambda _: launcher.build(root), range(3)))
    assert len(set(built)) == 1
    assert launch(str(built[0]), "--", "/bin/true").returncode == 0
    assert [p.name for p in built[0].parent.iterdir()] == [launcher.NAME]


def has_interpreter(binary: Path) -> bool:
    """Whether an ELF file asks for a dynamic loader (a PT_INTERP program header)."""
    data = binary.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2, "expected a 64-bit ELF file"
    phoff, phentsize, phnum = (
        int.from_bytes(data[32:40], "little"),
        int.from_bytes(data[54:56], "little"),
        int.from_bytes(data[56:58], "little"),
    )
    types = [int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") for i in range(phnum)]
    return 3 in types  # PT_INTERP


@pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="musl-tools is not installed (scripts/install adds it)")
def test_with_musl_installed_the_launcher_is_a_static_musl_build(tmp_path: Path) -> None:
    # glibc's start-up costs ~0.5 ms per exec on a VM (CPUID traps); musl's does not ask the CPU.
    built = launcher.build(tmp_path / "cache")
    assert not has_interpreter(built)
    assert b"glibc" not in built.read_bytes()
    assert launch(str(built), "--", "/bin/true").returncode == 0


def test_without_musl_the_host_compiler_builds_it_static(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    only_gcc = tmp_path / "bin"
    only_gcc.mkdir()
    for tool in ("gcc", "cc", "as", "ld"):
        if found := shutil.which(tool):
            (only_gcc / tool).symlink_to(found)
    monkeypatch.setattr(launcher, "_BUILD_ENV", {"PATH": str(only_gcc), "LANG": "C.UTF-8"})
    built = launcher.build(tmp_path / "cache")
    assert not has_interpreter(built)
    assert b"glibc" in built.read_bytes()
    assert launch(str(built), "--", "/bin/true").returncode == 0


def test_a_cache_others_can_write_is_not_used(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(launcher.LauncherUnavailable, match="writable by it alone"):
        launcher.build(root)


def test_without_a_compiler_the_sandbox_warns_once_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setattr(launcher, "_BUILD_ENV", {"PATH": str(empty)})
    monkeypatch.setattr(launcher, "cache_root", lambda: tmp_path / "cache")
    with pytest.raises(launcher.LauncherUnavailable, match="no C compiler"):
        launcher.build(tmp_path / "cache")
    server = launcher.ServerLauncher()  # a fresh server's, not this process's adopted one
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        assert server.path() is None
        assert server.path() is None  # no second attempt, no second warning
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "no C compiler" in caplog.records[0].getMessage()
