"""Optional isolation of a session's shell with bubblewrap (`isolation = "bwrap"`).

The shell sees the host read-only, a private /tmp, its own writable home, its own PID,
IPC and UTS namespaces, and (with `network = false`) only a loopback interface. It runs
with `--die-with-parent`, so even a server killed outright takes it down. The cost is
a few milliseconds at session start; commands run at the same speed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from session.errors import ConfigurationError


def bwrap_argv(shell_argv: list[str], *, home: Path, cwd: str, network: bool) -> list[str]:
    """Wrap `shell_argv` in bwrap.

    Raises:
        ConfigurationError: bwrap is not installed (apt-get install bubblewrap).
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigurationError("isolation 'bwrap' needs bubblewrap: apt-get install bubblewrap")
    argv = [
        bwrap,
        "--die-with-parent",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--bind", str(home), str(home),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "sandbox",
    ]  # fmt: skip
    if not network:
        argv.append("--unshare-net")
    return [*argv, "--chdir", cwd, "--", *shell_argv]


def inner_shell_pid(wrapper_pid: int, shell_name: str, depth: int = 4) -> int | None:
    """The real shell under bwrap (wrapper -> bwrap's init -> shell), found via /proc children."""
    frontier = [wrapper_pid]
    for _ in range(depth):
        children: list[int] = []
        for pid in frontier:
            try:
                children += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                continue
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == shell_name:
                    return child
            except OSError:
                continue
        frontier = children
    return None
