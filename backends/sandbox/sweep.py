"""The start-of-server sweep: what a server killed outright (SIGKILL, OOM) left behind.

Threat: a session's processes that outlive their server (it could not run `aclose`) and keep
running with nobody to stop them. Found by membership, not by tags: the dead server's cgroup
directories (`agentflow/<server_id>/...`, the server id names its pid), processes that run
under a session uid whose lock no live server holds, its runsc state, and its scratch
directory `<tmp>/agentflow-<server_id>` and its bind stage (tmpfs homes are unmounted first). Servers that are
alive are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from backends.sandbox import cgroups, gvisor, hostfs, mountns, uids
from backends.sandbox.spec import server_pid

log = logging.getLogger(__name__)

_SCRATCH = re.compile(r"^agentflow-(.+-\d+-[0-9a-fA-F]+)$")


@dataclass
class SweepReport:
    """What the sweep removed (for the server's log)."""

    killed: list[int] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)


def _dead(server_id: str) -> bool:
    pid = server_pid(server_id)
    return pid is not None and pid != os.getpid() and not os.path.exists(f"/proc/{pid}")


def _agentflow_dirs(base: Path, mount: Path) -> list[Path]:
    """`agentflow` cgroup dirs of one hierarchy: the server's own, and those of servers that ran
    in another cgroup (a service manager may start each server in a fresh one)."""
    found = {base / "agentflow"}
    for pattern in ("agentflow", "*/agentflow", "*/*/agentflow", "*/*/*/agentflow"):
        found.update(p for p in mount.glob(pattern) if p.is_dir())
    return sorted(found)


async def _sweep_cgroups(report: SweepReport) -> None:
    host = cgroups.probe()
    servers: dict[str, set[str]] = {}
    elsewhere: list[Path] = []
    for ctrl, base in host.bases.items():
        for agentflow in _agentflow_dirs(base, host.mounts.get(ctrl, base)):
            with contextlib.suppress(OSError):
                for server_dir in agentflow.iterdir():
                    if not (server_dir.is_dir() and _dead(server_dir.name)):
                        continue
                    if agentflow == base / "agentflow":
                        labels = servers.setdefault(server_dir.name, set())
                        labels.update(p.name for p in server_dir.iterdir() if p.is_dir())
                    else:
                        elsewhere.append(server_dir)
    for server_id, labels in servers.items():
        for label in labels:
            group = cgroups.SessionCgroup(host, server_id, label)
            report.killed += group.pids()
            await group.kill_all()
            group.remove()
            report.cgroups.append(f"{server_id}/{label}")
        for base in host.bases.values():
            cgroups.remove_tree(base / "agentflow" / server_id)
    for server_dir in elsewhere:
        report.killed += await cgroups.kill_tree(server_dir)
        if cgroups.remove_tree(server_dir):
            report.cgroups.append(str(server_dir))


def _sweep_uids(report: SweepReport) -> None:
    """Kill processes of session uids nobody holds (their server died before they were killed)."""
    by_uid: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                uid = os.stat(f"/proc/{entry}").st_uid
                if uids.UID_BASE <= uid < uids.UID_BASE + uids.UID_COUNT:
                    by_uid.setdefault(uid, []).append(int(entry))
    for uid, pids in by_uid.items():
        try:
            fd = os.open(uids.LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live server's session
        try:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    report.killed.append(pid)
        finally:
            os.close(fd)


def _sweep_dirs(report: SweepReport, tmp_root: Path) -> None:
    candidates: list[tuple[str, Path]] = []
    with contextlib.suppress(OSError):
        for entry in tmp_root.iterdir():
            match = _SCRATCH.match(entry.name)
            if match and entry.is_dir():
                candidates.append((match.group(1), entry))
    for root in (gvisor.STATE_ROOT, hostfs.STAGE_ROOT):
        with contextlib.suppress(OSError):
            candidates += [(p.name, p) for p in root.iterdir() if p.is_dir()]
    for server_id, path in candidates:
        if not _dead(server_id):
            continue
        for mount in hostfs.mounts_under(path):
            mountns.unmount(mount)
        shutil.rmtree(path, ignore_errors=True)
        report.dirs.append(str(path))


async def sweep_orphans(tmp_root: Path | None = None) -> SweepReport:
    """Kill and remove what dead servers left (cgroups, session-uid processes, scratch, runsc state)."""
    report = SweepReport()
    with anyio.CancelScope(shield=True):
        await _sweep_cgroups(report)
        await anyio.to_thread.run_sync(_sweep_uids, report)
        await anyio.to_thread.run_sync(_sweep_dirs, report, tmp_root or Path(tempfile.gettempdir()))
    if report.killed or report.cgroups or report.dirs:
        log.info(
            "swept orphans of dead servers: %d processes, %d cgroups, %d directories",
            len(report.killed),
            len(report.cgroups),
            len(report.dirs),
        )
    return report
