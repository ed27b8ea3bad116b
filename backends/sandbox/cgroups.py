"""Per-session cgroups: the limits (memory, pids, CPU) and the membership cleanup relies on.

Threat: a session that forks without bound, eats the host's memory or CPU, or escapes its
process group (`setsid`, double fork, dropped environment tags) to outlive its session. A
cgroup is inherited by every descendant and cannot be left without privileges, so its
`cgroup.procs` is the authoritative list of a session's processes.

Layout: `<controller mount>/<the server's own cgroup>/agentflow/<server_id>/<label>` for each
controller (cgroup v1: memory, pids, cpu, freezer) or once in the unified tree (v2). Nesting
under the server's own cgroup keeps sessions inside whatever limits the server itself runs
under. The process joins its cgroups *before* it execs (see `enter_prefix`), so no child can
be forked outside them.

Killing: v2 writes `cgroup.kill`. v1 has none: freeze (freezer) so nothing forks while we
look, SIGKILL every member, thaw so the kills are delivered, then poll until empty.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from backends.policy import Limits

log = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000
#: The kernel's CPU weight of a task per niceness -20..19 (sched_prio_to_weight; nice 0 = 1024).
#: A session's cgroup is scheduled as one entity among its siblings by its weight, and a
#: task's niceness only ranks it among the tasks of its own cgroup, so the session's niceness
#: is carried to its cgroup's weight (measured: bench/bench_pool_priority.py).
NICE_TO_WEIGHT = (
    88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
    9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
    1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
    110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
)  # fmt: skip
#: Shell snippet run as `/bin/sh -c ENTER sh <procs files...> -- argv...`: joins each cgroup, then execs.
ENTER_SCRIPT = 'for f do [ "$f" = -- ] && break; echo $$ > "$f" || exit 126; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class CgroupHost:
    """What the host offers: the cgroup version in use and the base directory per controller."""

    version: int | None
    #: v1: controller -> base dir; v2: every controller -> the same base dir.
    bases: dict[str, Path] = field(default_factory=dict)
    reason: str = ""
    #: controller -> the hierarchy's mount point (where other servers' cgroups may also live).
    mounts: dict[str, Path] = field(default_factory=dict)

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(sorted(self.bases))

    def describe(self) -> dict[str, object]:
        return {
            "version": self.version,
            "controllers": list(self.controllers),
            "bases": {k: str(v) for k, v in sorted(self.bases.items())},
            **({"unavailable": self.reason} if self.reason else {}),
        }


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rparts = right.split()
            if len(fields) < 5 or len(rparts) < 3 or rparts[0] not in ("cgroup", "cgroup2"):
                continue
            found.append((fields[4], rparts[0], set(rparts[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path; the unified hierarchy under the key ''."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as fh:
        for line in fh:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                own[ctrl] = path
    return own


def _usable(base: Path) -> bool:
    try:
        (base / "agentflow").mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(base / "agentflow", os.W_OK)


def _probe_v2(mount: str, own: dict[str, str]) -> CgroupHost | None:
    base = Path(mount) / own.get("", "/").lstrip("/")
    try:
        available = set((Path(mount) / "cgroup.controllers").read_text().split())
    except OSError:
        return None
    wanted = [c for c in V2_CONTROLLERS if c in available]
    if "memory" not in wanted or "pids" not in wanted or not _usable(base):
        return None
    agentflow = base / "agentflow"
    try:
        # Controllers must be enabled top-down; a non-root cgroup with processes refuses it.
        for directory in (base, agentflow):
            (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
    except OSError as exc:
        log.info("cgroup v2 at %s cannot delegate controllers: %s", base, exc)
        return None
    return CgroupHost(2, dict.fromkeys(wanted, base), mounts=dict.fromkeys(wanted, Path(mount)))


@functools.cache
def probe() -> CgroupHost:
    """The cgroup setup this server can use (cached: the host does not change under us)."""
    mounts = _mounts()
    own = _own_paths()
    for mount, fstype, _ in mounts:
        if fstype == "cgroup2" and mount == "/sys/fs/cgroup":
            host = _probe_v2(mount, own)
            if host:
                return host
    bases: dict[str, Path] = {}
    points: dict[str, Path] = {}
    for mount, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for ctrl in V1_CONTROLLERS:
            if ctrl in options and ctrl not in bases:
                base = Path(mount) / own.get(ctrl, "/").lstrip("/")
                if _usable(base):
                    bases[ctrl] = base
                    points[ctrl] = Path(mount)
    if "memory" in bases or "pids" in bases:
        return CgroupHost(1, bases, mounts=points)
    reason = "no writable cgroup hierarchy with memory or pids (not root, or no cgroups mounted)"
    return CgroupHost(None, {}, reason)


def _read_pids(path: Path | str) -> list[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return [int(x) for x in b"".join(chunks).split()]
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each pid; those already gone (or not ours to signal) are skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class SessionCgroup:
    """The cgroups of one session (one directory per v1 controller, or one v2 directory)."""

    def __init__(self, host: CgroupHost, server_id: str, label: str) -> None:
        self.host = host
        self.dirs: dict[str, Path] = {c: b / "agentflow" / server_id / label for c, b in host.bases.items()}
        self.limits_in_force: dict[str, str] = {}
        # Plain strings, made once: these files are opened on every spawn and teardown.
        self._procs_files = [f"{d}/cgroup.procs" for d in dict.fromkeys(self.dirs.values())]
        self._primary_procs = f"{self.primary}/cgroup.procs" if self.dirs else ""

    @property
    def primary(self) -> Path:
        """The directory whose `cgroup.procs` lists the session (any one holds every member)."""
        for ctrl in ("pids", "freezer", "memory", "cpu"):
            if ctrl in self.dirs:
                return self.dirs[ctrl]
        raise LookupError("no cgroup")

    def create(self, limits: Limits) -> None:
        """Make the directories and write the limits.

        Raises OSError with nothing left behind; an existing directory is never adopted (it
        would be another session's, and closing this one would kill it).
        """
        created: list[Path] = []
        try:
            for directory in dict.fromkeys(self.dirs.values()):
                _make_session_dir(directory)
                created.append(directory)
            if self.host.version == 2:
                self._limit_v2(limits)
            else:
                self._limit_v1(limits)
        except OSError:
            for directory in created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise

    def _write(self, ctrl: str, name: str, value: str, *, limit: bool = True) -> None:
        """Write one control file; a limit is also recorded in `limits_in_force`."""
        fd = os.open(self.dirs[ctrl] / name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        if limit:
            self.limits_in_force[name] = value

    def _limit_v1(self, limits: Limits) -> None:
        memory = limits.memory_mb << 20
        if "memory" in self.dirs:
            self._write("memory", "memory.limit_in_bytes", str(memory))
            if _has_memsw(self.host.bases["memory"]):
                self._write("memory", "memory.memsw.limit_in_bytes", str(memory))
        if "pids" in self.dirs:
            self._write("pids", "pids.max", str(limits.pids))
        if "cpu" in self.dirs:
            self._write("cpu", "cpu.cfs_period_us", str(CFS_PERIOD_US))
            self._write("cpu", "cpu.cfs_quota_us", str(max(1000, int(limits.cpu * CFS_PERIOD_US))))

    def _limit_v2(self, limits: Limits) -> None:
        if "memory" in self.dirs:
            self._write("memory", "memory.max", str(limits.memory_mb << 20))
            with contextlib.suppress(OSError):
                self._write("memory", "memory.swap.max", "0")
        if "pids" in self.dirs:
            self._write("pids", "pids.max", str(limits.pids))
        if "cpu" in self.dirs:
            self._write("cpu", "cpu.max", f"{max(1000, int(limits.cpu * CFS_PERIOD_US))} {CFS_PERIOD_US}")

    def weigh_as_nice(self, nice: int) -> None:
        """Give the session's cpu cgroup the weight the kernel gives one task of niceness `nice`.

        v1 `cpu.shares` takes that weight (1024 at nice 0); v2 `cpu.weight` is the same on a
        scale where 100 is nice 0. Raises OSError (the caller decides whether that matters).
        """
        if "cpu" not in self.dirs:
            return
        weight = NICE_TO_WEIGHT[nice + 20]
        if self.host.version == 2:
            name, value = "cpu.weight", min(max(round(weight * 100 / 1024), 1), 10_000)
        else:
            name, value = "cpu.shares", max(weight, 2)
        self._write("cpu", name, str(value), limit=False)  # a weight, not a limit

    def open_procs(self) -> list[int]:
        """A write descriptor (close-on-exec) of each `cgroup.procs` of the session, for the launcher.

        Raises OSError with none left open.
        """
        fds: list[int] = []
        try:
            for path in self._procs_files:
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def enter_prefix(self) -> list[str]:
        """argv prefix that joins every cgroup of the session, then execs the rest (no launcher)."""
        return ["/bin/sh", "-c", ENTER_SCRIPT, "sh", *self._procs_files, "--"]

    def pids(self) -> list[int]:
        return _read_pids(self._primary_procs) if self._primary_procs else []

    def threads(self) -> list[int]:
        """Every thread id in the session (niceness is per thread on Linux)."""
        try:
            return _read_pids(self.primary / ("cgroup.threads" if self.host.version == 2 else "tasks"))
        except LookupError:
            return []

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed so far (v1 counts failures instead)."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            name = "memory.events" if self.host.version == 2 else "memory.oom_control"
            for line in (memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    async def kill_all(self, within: float = 10.0, *, freeze: bool = True) -> bool:
        """SIGKILL every member (frozen first on v1) and wait until none is left; True if empty.

        `freeze=False` for members that cannot fork behind our back but may not freeze
        promptly (gVisor's ptrace-stopped stubs keep a v1 freezer in FREEZING).
        """
        if not self.dirs:
            return True
        if self.host.version == 2:
            with contextlib.suppress(OSError):
                (self.primary / "cgroup.kill").write_text("1")
        freezer = self.dirs.get("freezer")
        if self.host.version == 1 and freezer is not None and freeze:
            await self._freeze_and_kill(freezer)
        with anyio.move_on_after(within):
            while members := self.pids():
                kill_pids(members)
                await anyio.sleep(0.005)
            return True
        log.warning("cgroup %s still has members after %.0fs: %s", self.primary, within, self.pids())
        return False

    async def _freeze_and_kill(self, freezer: Path) -> None:
        state = freezer / "freezer.state"
        try:
            state.write_text("FROZEN")
            # Freezing is asynchronous; FREEZING means some task has not stopped yet.
            with anyio.move_on_after(1.0):
                while state.read_text().strip() != "FROZEN":  # noqa: ASYNC110 - the kernel offers no event
                    await anyio.sleep(0.002)
            kill_pids(self.pids())
        except OSError as exc:
            log.debug("freezer %s: %s", freezer, exc)
        finally:
            with contextlib.suppress(OSError):
                state.write_text("THAWED")

    def remove(self) -> None:
        """rmdir the session's directories (and its server's, once empty). Never raises."""
        for directory in dict.fromkeys(self.dirs.values()):
            try:
                # A session makes no child cgroups (it cannot: no write access), so a plain
                # rmdir is the rule; the tree walk (a stat of every control file) is the fallback.
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                remove_tree(directory)
            with contextlib.suppress(OSError):
                directory.parent.rmdir()  # the server's dir, if this was its last session


def _make_session_dir(directory: Path, attempts: int = 5) -> None:
    """mkdir a session's cgroup under its server's directory.

    Another session's `remove` (running in the background after a kill) may rmdir the
    server's directory (its last session gone) around our parent mkdir: then the parent
    mkdir sees it exist and vanish (FileExistsError from `exist_ok`), or ours finds no
    parent. Make the parent again and retry.
    """
    for attempt in range(attempts):
        try:
            if attempt:
                directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir()  # the server's directory usually exists: one mkdir, no stat
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            continue
        except FileExistsError:
            if directory.is_dir() or attempt == attempts - 1:
                raise  # our own directory exists: never adopt another session's


@functools.cache
def _has_memsw(memory_base: Path) -> bool:
    """Whether the memory controller accounts swap (a kernel setting: probed once)."""
    return (memory_base / "memory.memsw.limit_in_bytes").exists()


def _tree_pids(directory: Path) -> list[int]:
    return [pid for procs in directory.rglob("cgroup.procs") for pid in _read_pids(procs)]


async def kill_tree(directory: Path, within: float = 10.0) -> list[int]:
    """SIGKILL every member of a cgroup directory and its children until they are empty."""
    killed: list[int] = []
    with anyio.move_on_after(within):
        while True:
            members = _tree_pids(directory)
            if not members:
                break
            kill_pids(members)
            killed += members
            await anyio.sleep(0.005)
    return sorted(set(killed))


def remove_tree(directory: Path) -> bool:
    """rmdir a cgroup directory and its children, deepest first; True if it is gone."""
    try:
        children = [p for p in directory.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for child in children:
        remove_tree(child)
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove cgroup %s: %s", directory, exc)
            return False
    return True
