"""The process table, read through psutil (one place; no hand-rolled /proc parsing in tests)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ProcessLookupError, OSError)


def alive(pid: int) -> bool:
    """True while `pid` exists and has not died (a zombie has died; it only awaits reaping)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except _GONE:
        return False


def name(pid: int) -> str:
    """The process's short name (`comm`), or "" once it is gone."""
    try:
        return psutil.Process(pid).name()
    except _GONE:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except _GONE:
        return []


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces ("" once it is gone)."""
    return " ".join(cmdline(pid))


def environ(pid: int) -> dict[str, str]:
    """The process's environment at exec time ({} once it is gone or unreadable)."""
    try:
        return psutil.Process(pid).environ()
    except _GONE:
        return {}


def cgroups(pid: int) -> list[str]:
    """The cgroup paths of `pid` (one per hierarchy; v2 has one), [] once it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:  # psutil has no cgroup reader
            return [line.rstrip("\n").split(":", 2)[2] for line in fh if line.count(":") >= 2]
    except OSError:
        return []


def live_processes() -> Iterator[psutil.Process]:
    """Every live (non-zombie) process except this one, with `environ`, `cmdline` and `name` prefetched."""
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "status", "environ", "cmdline"]):
        if proc.pid == me or proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        yield proc


def pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid` (a session's own uid)."""
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if process.info["uids"].real == uid and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True) if alive(child.pid)]
    except _GONE:
        return []


def kill(pids: Iterable[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def pss_kb(pids: Iterable[int]) -> int:
    """Sum of proportional set size (kB) over `pids` (vanished ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(*_GONE):
            total += psutil.Process(pid).memory_full_info().pss // 1024
    return total


def rss_kb(pid: int | None = None) -> int:
    return int(psutil.Process(pid or os.getpid()).memory_info().rss // 1024)


def held_mount_namespaces() -> set[str]:
    """Mount namespaces this process holds open by descriptor (each live sandboxed session's own)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if link.startswith("mnt:["):
            held.add(link)
    return held
