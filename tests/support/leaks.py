"""What THIS test run left behind: session processes, scratch directories, cgroups.

Several test runs (other branches, CI, benchmarks) share the machine, so a leak check
that counts every `bash` or `Xvfb` on the host fails for reasons outside the change.
Every check here counts only the current run's leftovers, identified by the per-run id
that tests/conftest.py puts in `AGENTFLOW_RUN_ID` before any test starts. Every server a
test starts (in-process, or a subprocess inheriting the environment) belongs to the run,
and the engine derives its identities from it:

- server id  `<run id>-<pid>-<hex>`; scratch root `<tempdir>/agentflow-<server id>/`;
- session cgroups `/sys/fs/cgroup[/<controller>]/agentflow/<server id>/<session label>/`;
- until the sandbox lands, session processes carry `AGENTFLOW_SERVER=<server pid>` and
  `AGENTFLOW_SESSION=<tag>` (backends/processes.py), and legacy scratch directories
  `<tempdir>/agentflow-*` hold a `.agentflow-server` file naming their server's pid.

A process belongs to this run when any of these holds: a cgroup path under
`agentflow/<run id>-`; `AGENTFLOW_SERVER` names a server pid of this run (this pytest
process, a server noted with `note_server`, or any process seen carrying this run's id);
a per-test marker (`AGENTFLOW_TEST_RUN`) made by `new_test_marker()`; or this run's id in its
own environment next to a session tag.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from backends.processes import OWNER_FILE, SERVER_ENV_MARKER, SESSION_ENV_MARKER
from tests.support import procs
from tests.support.manifests import TEST_MARKER_ENV
from tests.support.polling import eventually

RUN_ID_ENV = "AGENTFLOW_RUN_ID"
CGROUP_ROOT = Path("/sys/fs/cgroup")

_servers: set[int] = set()


def new_run_id() -> str:
    """A fresh run id: short (it prefixes directory and cgroup names) and unique enough."""
    return "t" + uuid.uuid4().hex[:10]


def run_id() -> str:
    """This run's id (set by tests/conftest.py at configure time; made here when run outside pytest)."""
    value = os.environ.get(RUN_ID_ENV)
    if not value:
        value = os.environ[RUN_ID_ENV] = new_run_id()
    return value


def new_test_marker() -> str:
    """A per-test marker (`<run id>-<hex>`) for a manifest's bash env: `session_pids(test_marker=...)`."""
    return f"{run_id()}-{uuid.uuid4().hex[:8]}"


def is_run_server_id(server_id: str) -> bool:
    """True for a server id (`<run id>-<pid>-<hex>`) minted by a server of this run."""
    return server_id.startswith(f"{run_id()}-")


def note_server(pid: int) -> None:
    """Record `pid` as a server of this run (so its sessions count even after it was SIGKILLed)."""
    _servers.add(pid)


def server_pids() -> set[int]:
    """Server pids of this run seen so far: this process, noted ones, and any seen with this run's id."""
    return {os.getpid(), *_servers}


def _in_run(env: dict[str, str], cgroup_paths: list[str], marker: str, servers: set[int]) -> bool:
    if any(f"/agentflow/{marker}-" in path for path in cgroup_paths):
        return True
    owner = env.get(SERVER_ENV_MARKER, "")
    if owner.isdigit() and int(owner) in servers:
        return True
    if env.get(TEST_MARKER_ENV, "").startswith(f"{marker}-"):
        return True
    return env.get(RUN_ID_ENV) == marker and SESSION_ENV_MARKER in env


def _session_label(env: dict[str, str], cgroup_paths: list[str], marker: str) -> str | None:
    """The session tag (env marker), else the cgroup label below `agentflow/<server id>/`."""
    if SESSION_ENV_MARKER in env:
        return env[SESSION_ENV_MARKER]
    for path in cgroup_paths:
        parts = path.split("/")
        if "agentflow" in parts:
            below = parts[parts.index("agentflow") + 1 :]
            if len(below) >= 2 and below[0].startswith(f"{marker}-"):
                return below[1]
    return None


def session_pids(
    tag: str | None = None,
    *,
    tag_prefix: str = "",
    test_marker: str | None = None,
    with_descendants: bool = False,
) -> list[int]:
    """Live session processes of this run, sorted.

    `tag` keeps one session's (exact `AGENTFLOW_SESSION` or cgroup label); `tag_prefix` a
    kind (`"bash-"`, `"vm-"`); `test_marker` one test's (`AGENTFLOW_TEST_RUN`).
    `with_descendants` adds their live descendants: Chromium's helpers rewrite their
    environ with a process title, so only their ancestry shows whose they are.
    """
    marker = run_id()
    candidates: list[tuple[int, dict[str, str]]] = []
    for proc in procs.live_processes():
        env = proc.info["environ"] or {}
        if env.get(RUN_ID_ENV) == marker and SESSION_ENV_MARKER not in env:
            _servers.add(proc.pid)  # a process this run started (server, client, helper)
        candidates.append((proc.pid, env))
    servers = server_pids()
    found: set[int] = set()
    for pid, env in candidates:
        groups = procs.cgroups(pid)
        if not _in_run(env, groups, marker, servers):
            continue
        label = _session_label(env, groups, marker)
        if label is None or not label.startswith(tag_prefix):
            continue
        if tag is not None and label != tag:
            continue
        if test_marker is not None and env.get(TEST_MARKER_ENV) != test_marker:
            continue
        found.add(pid)
    if with_descendants:
        for pid in list(found):
            found.update(procs.descendants(pid))
    return sorted(found)


def run_pids() -> list[int]:
    """Every live process of this run: its session processes (and their trees) and this process's descendants."""
    found = set(session_pids(with_descendants=True))
    found.update(procs.descendants(os.getpid()))
    return sorted(found)


def scratch_dirs(root: Path | None = None) -> list[Path]:
    """Scratch directories of this run under `root` (default: the temp dir).

    `agentflow-<run id>-*` (a server's scratch root), plus legacy `agentflow-*` directories
    whose owner file names a server pid of this run.
    """
    base = root or Path(tempfile.gettempdir())
    marker, servers = run_id(), server_pids()
    found = []
    for entry in base.glob("agentflow-*"):
        if entry.name.startswith(f"agentflow-{marker}-"):
            found.append(entry)
            continue
        try:
            owner = (entry / OWNER_FILE).read_text().strip()
        except OSError:
            continue
        if owner.isdigit() and int(owner) in servers:
            found.append(entry)
    return sorted(found)


def cgroup_dirs() -> list[Path]:
    """Cgroup directories this run's servers made that still exist (v1 controllers and v2)."""
    pattern = f"agentflow/{run_id()}-*"
    found = list(CGROUP_ROOT.glob(pattern)) + list(CGROUP_ROOT.glob(f"*/{pattern}"))
    return sorted(path for path in found if path.is_dir())


def kill_leftovers(*, test_marker: str | None = None) -> list[int]:
    """SIGKILL this run's session processes (one test's with `test_marker`); returns their pids."""
    leftovers = session_pids(test_marker=test_marker, with_descendants=True)
    procs.kill(leftovers)
    return leftovers


async def wait_gone(
    tag: str | None = None, *, tag_prefix: str = "", test_marker: str | None = None, within: float = 15.0
) -> None:
    """Poll until no session process of this run matches (see `session_pids`); fail after `within` s."""

    def gone() -> bool:
        return not session_pids(tag, tag_prefix=tag_prefix, test_marker=test_marker)

    def still() -> str:
        left = session_pids(tag, tag_prefix=tag_prefix, test_marker=test_marker)
        return f"session processes (tag={tag or tag_prefix or '*'}, test={test_marker}) to exit; alive: {left}"

    await eventually(gone, within, what=still)


__all__ = [
    "RUN_ID_ENV",
    "cgroup_dirs",
    "is_run_server_id",
    "kill_leftovers",
    "new_run_id",
    "new_test_marker",
    "note_server",
    "run_id",
    "run_pids",
    "scratch_dirs",
    "server_pids",
    "session_pids",
    "wait_gone",
]
