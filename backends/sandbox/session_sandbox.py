"""`SessionSandbox`: one session's processes, inside the isolation tier its policy asks for.

What it owns for a session: a unique uid (tiers `sandbox`/`gvisor`), its cgroups (limits and
membership), its size-capped home and /tmp, and every process it spawned with everything
those forked. `aclose` is the single place that ends all of it: the threat it answers is a
hostile process that tries to outlive its session (setsid, double fork, dropped tags), so
members are found by cgroup (else by uid, else by pid namespace), never by environment.

The environment a caller passes is the *complete* environment inside; host-side helper
processes (the launcher, bwrap, runsc) run with a fixed minimal one, so nothing a session
chose reaches the host's dynamic loader (the LD_PRELOAD-through-config escape).

Every spawn starts with `agentflow-launch` (backends/sandbox/launcher.c): it joins the
session's cgroups through descriptors opened here (closed before it execs), enters the
session's mount namespace (tiers `sandbox`, `gvisor`: see `mountns`), sets the niceness,
switches to the session's uid with no capabilities (tier `sandbox`), and resets every signal
to its default disposition with nothing blocked, so a program never inherits the server's
ignored SIGINT (a server started with `&` from a script). Where no C compiler can build it,
the same steps run as `sh -c ENTER` + `nsenter` + `nice` + `setpriv` + `env --default-signal`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import Process

from backends.sandbox import bwrap, cgroups, gvisor, hostfs, launcher, seccomp, uids
from backends.sandbox.host import host_mechanisms
from backends.sandbox.memfd import data_fd
from backends.sandbox.network import check_network
from backends.sandbox.spawn import spawn as spawn_process
from backends.sandbox.spec import HOME_INSIDE, Bind, SandboxSpec, check_nice
from session.errors import ConfigurationError, ParameterError

log = logging.getLogger(__name__)

#: The whole environment of host-side helpers (never the server's, never the session's).
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
SETPRIV = "/usr/bin/setpriv"
NSENTER = "/usr/bin/nsenter"
NICE = "/usr/bin/nice"
#: The last link of the fallback chain: every signal back to its default disposition.
DEFAULT_SIGNALS = ["/usr/bin/env", "--default-signal", "--"]
#: How often `renice` re-reads the members for threads forked while it ran (a fork bomb is
#: bounded by pids.max; the passes stop as soon as one finds nothing new).
_RENICE_PASSES = 8
_Stream = int | IO[Any] | None


def _children(pid: int) -> list[int]:
    try:
        fd = os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.exists(f"/proc/{pid}"):
            return _children_by_scan(pid)  # kernel without CONFIG_PROC_CHILDREN
        return []
    except OSError:
        return []
    try:
        return [int(x) for x in os.read(fd, 65536).split()]
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def _pids_of_uid(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
    return found


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _pids_in_ns(namespaces: set[str]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_ns(int(entry)) in namespaces:
            found.append(int(entry))
    return found


def _tasks_of(pids: Sequence[int]) -> list[int]:
    tids: list[int] = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            tids += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return tids


def _write_oom_score_adj(pid: int, value: int) -> bool:
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, str(value).encode())
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


#: Most a session's tmpfs mounts may hold for its release to run on the event loop (~0.5 ms
#: of freeing pages and inodes here); more goes to a worker thread.
QUICK_RELEASE_BYTES = 8 << 20
QUICK_RELEASE_FILES = 512


class SessionSandbox:
    """One session's sandbox. Make it with `await SessionSandbox.create(spec)`."""

    def __init__(self, spec: SandboxSpec, *, tier: str, uid: int, lease: uids.UidLease | None) -> None:
        self.spec = spec
        self.tier = tier
        self.uid = uid
        self._lease = lease
        self._emptied = False
        self._cgroup: cgroups.SessionCgroup | None = None
        self._rlimit_prefix: list[str] = []
        self._storage = hostfs.SessionStorage(spec.server_id, spec.label, spec.home, uid)
        self._processes: list[Process] = []
        self._namespaces: set[str] = set()
        self._containers: list[str] = []
        self._counter = itertools.count(1)
        self._gvisor_state: Path | None = None
        self._closed = False
        #: Niceness of later spawns; None: the server's own (spec.nice 0 leaves it as is).
        self._nice: int | None = spec.nice or None
        #: The launcher binary (None: the fallback chain); found in `_setup`, off the event loop.
        self._launcher: str | None = None
        #: pidfds of the killed pid-namespace inits (tier `sandbox`): readable once a namespace is empty.
        self._init_fds: list[int] = []
        #: /etc files the sandbox shows in place of the host's (its user's entry; not tier `none`).
        self._etc_files: dict[str, bytes] = {}
        self._wrappers_killed = False

    # -- construction ---------------------------------------------------------------

    @classmethod
    async def create(cls, spec: SandboxSpec) -> SessionSandbox:
        """Allocate the session's uid, cgroups and storage.

        Inline when that is only short system calls (see `_quick_setup`), else in one worker-thread hop.

        Raises:
            ConfigurationError: the tier or network the policy asks for cannot be provided
                here (5001, with the reason); nothing is downgraded.
        """
        tier = spec.policy.isolation
        if (tier, spec.policy.network) not in _TIERS_OK:
            # The first check probes the host (subprocesses); later ones are a set lookup.
            await anyio.to_thread.run_sync(_check_tier, tier, spec.policy.network)
        box = cls(spec, tier=tier, uid=os.geteuid(), lease=None)
        try:
            if box._quick_setup():
                box._setup()
            else:
                await anyio.to_thread.run_sync(box._setup)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await box.aclose()
            raise
        return box

    def _quick_setup(self) -> bool:
        """Whether `_setup` is only short system calls now (~1 ms: cgroups, a mount namespace,
        a few directories), so it runs on the event loop.

        Why not a worker thread: every one of those calls hands the GIL back and forth with
        the busy event loop there. Measured (HTTP, back-to-back temporary calls): ~50 more
        context switches per session (cross-CPU wakeups, ~20 us each on a VM) and ~1.2 ms
        more server CPU per call than the work itself. Still in a thread: the launcher's
        first build or hourly check, gVisor's state directories, a home to seed (a copy
        of whatever the caller put there, of any size), and a uid lease that needs a new batch.
        """
        if self.tier == "gvisor" or not launcher.settled():
            return False
        if self.tier != "none" and os.geteuid() == 0 and not uids.spare_ready():
            return False  # leasing a batch of uids scans /proc: as long as the host has processes
        try:
            with os.scandir(self.spec.home) as entries:
                return next(entries, None) is None
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def _quick_release(self) -> bool:
        """Whether `_release` is only short system calls now, so it runs on the event loop (why:
        see `_quick_setup`). Not when it frees a full tmpfs (closing the namespace frees its
        pages there and then: 800 MB took 46 ms here) or gVisor's state tree."""
        if self._gvisor_state is not None:
            return False
        held = self._storage.footprint()
        return held is not None and held[0] <= QUICK_RELEASE_BYTES and held[1] <= QUICK_RELEASE_FILES

    def _lease_uid(self) -> None:
        if self.tier == "none" or os.geteuid() != 0:
            return
        try:
            self._lease = uids.allocate()
        except OSError as exc:
            raise ConfigurationError(f"cannot give the session its own uid: {exc}") from None
        self.uid = self._storage.uid = self._lease.uid

    def _setup(self) -> None:
        self._launcher = launcher.path()
        self._lease_uid()
        if self.tier != "none":  # tier none shares the host's /etc
            self._etc_files = bwrap.identity_files(self.uid)
        limits = self.spec.policy.limits
        host = cgroups.probe()
        if host.version is not None:
            cgroup = cgroups.SessionCgroup(host, self.spec.server_id, self.spec.label)
            host_limits = limits
            if self.tier == "gvisor":
                host_limits = limits.model_copy(update={"pids": limits.pids + gvisor.PIDS_OVERHEAD})
            try:
                cgroup.create(host_limits)
            except OSError as exc:
                raise ConfigurationError(f"cannot create the session's cgroups under {cgroup.primary}: {exc}") from None
            self._cgroup = cgroup
            if self._nice is not None:
                self._weigh_cgroup(self._nice)
        else:
            self._rlimit_prefix = [
                "prlimit",
                f"--nproc={limits.pids}",
                f"--as={limits.memory_mb << 20}",
                f"--fsize={limits.disk_mb << 20}",
                "--",
            ]
        try:
            self._storage.prepare(limits.disk_mb, self._binds(), private_tmp=self.tier != "none")
        except OSError as exc:
            raise ConfigurationError(f"cannot prepare the session's home {self.spec.home}: {exc}") from None
        if self.tier == "gvisor":
            # One runsc state root per session: removing it forgets every container of the session
            # without a `runsc delete` per container (a Go binary start, ~1 s here, each).
            server_state = gvisor.STATE_ROOT / self.spec.server_id
            server_state.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._gvisor_state = server_state / self.spec.label
            self._gvisor_state.mkdir(mode=0o700)
            (self._gvisor_state / "bundles").mkdir(mode=0o700)

    # -- running ----------------------------------------------------------------------

    @property
    def home_path(self) -> str:
        """Where the session sees its home (set HOME to this)."""
        return str(self.spec.home) if self.tier == "none" else HOME_INSIDE

    def _binds(self) -> list[Bind]:
        granted = [Bind(Path(m.host), m.path or m.host, m.mode == "rw") for m in self.spec.policy.mounts]
        return [*granted, *self.spec.binds]

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None = None,
        stdin: _Stream = None,
        stdout: _Stream = None,
        stderr: _Stream = None,
        pass_fds: Sequence[int] = (),
    ) -> Process:
        """Start `argv` inside the session's sandbox; `env` is its complete environment.

        The program starts with every signal at its default disposition and none blocked
        (whatever the server ignores or blocks), at the session's niceness, inside the
        session's cgroups from its first instruction, and with no descriptor of the server
        beyond its standard streams and `pass_fds`.

        Raises:
            ParameterError: argv is empty, or an environment name or value is malformed (1002).
            RuntimeError: the sandbox is already closed (a backend bug, not a client error).
        """
        if self._closed:
            raise RuntimeError("the session sandbox is closed")
        if not argv:
            raise ParameterError("argv must not be empty")
        env = bwrap.check_env(env)
        extra_fds: list[int] = []
        host_cwd = "/"
        try:
            if self.tier == "sandbox":
                # Inline: a few memfd writes (the layout is probed once per server), cheaper
                # than the hop to a worker thread.
                command = self._bwrap_command(argv, env, cwd, extra_fds)
            elif self.tier == "gvisor":
                command = await anyio.to_thread.run_sync(self._gvisor_command, argv, env, cwd)
            else:
                command = self._plain_command(argv)
                host_cwd = cwd or str(self.spec.home)
            for attempt in (1, 2):
                prefix_fds: list[int] = []
                try:
                    prefix = self._prefix(prefix_fds)
                    # Popen's vfork on every event loop (see backends.sandbox.spawn: uvloop would fork).
                    process = spawn_process(
                        [*self._rlimit_prefix, *prefix, *command],
                        env=env if self.tier == "none" else HOST_ENV,
                        cwd=host_cwd,
                        stdin=stdin,
                        stdout=stdout,
                        stderr=stderr,
                        pass_fds=(*pass_fds, *extra_fds, *prefix_fds),
                    )
                    break
                except FileNotFoundError:
                    # The cached launcher may have been deleted under this session: find it
                    # again (a rebuild, or the fallback chain), once. Found: nothing changes.
                    if attempt == 2 or self._launcher is None:
                        raise
                    log.warning("sandbox %s: cannot start %s; looking for it again", self.spec.label, self._launcher)
                    self._launcher = await anyio.to_thread.run_sync(launcher.path)
                finally:
                    for fd in prefix_fds:
                        os.close(fd)
        finally:
            for fd in extra_fds:
                os.close(fd)
        self._processes.append(process)
        return process

    def _prefix(self, fds: list[int]) -> list[str]:
        """The host-side start of a spawn: the session's mount namespace, cgroups, niceness, uid
        switch (tier `sandbox`), default signals.

        Appends the descriptors the child must inherit to `fds` (the caller closes them).
        """
        switch_uid = self.tier == "sandbox" and self._lease is not None
        namespace = self._storage.namespace_fd
        if self._launcher is None:
            chain = self._cgroup.enter_prefix() if self._cgroup else []
            # By the server's own descriptor: nothing to pass on that the program could inherit.
            enter = [NSENTER, f"--mount=/proc/{os.getpid()}/fd/{namespace}", "--"] if namespace is not None else []
            return [*chain, *enter, *self._nice_prefix(), *(self._setpriv() if switch_uid else []), *DEFAULT_SIGNALS]
        argv = [self._launcher]
        if namespace is not None:
            # A copy: the caller closes what it passes, and the storage keeps its own.
            fds.append(os.dup(namespace))
            argv.append(f"--mntns-fd={fds[-1]}")
        if self._cgroup is not None:
            procs = self._cgroup.open_procs()
            fds += procs
            argv += [f"--cgroup-fd={fd}" for fd in procs]
        if self._nice is not None:
            argv.append(f"--nice={self._nice}")
        if switch_uid:
            argv.append(f"--uid={self.uid}")
        return [*argv, "--"]

    def _nice_prefix(self) -> list[str]:
        if self._nice is None:
            return []
        # `nice` adds to the niceness it inherits (this thread's); the spec's value is absolute.
        delta = self._nice - os.getpriority(os.PRIO_PROCESS, 0)
        return [NICE, "-n", str(delta)] if delta else []

    def renice(self, nice: int) -> None:
        """Give every live process of the session (each thread) and every later spawn niceness `nice`.

        A failure (a server that is not root cannot lower a niceness) is logged at debug level
        and ignored: niceness is a scheduling preference, not a limit.

        Raises:
            ParameterError: `nice` is outside -20..19.
        """
        check_nice(nice)
        self._nice = nice
        self._weigh_cgroup(nice)
        done: set[int] = set()
        # A thread forked by a member not yet reniced inherits the old value; it is in the
        # cgroup from its fork on, so the next pass finds it. Stop at a pass with nothing new.
        for _ in range(_RENICE_PASSES):
            fresh = [tid for tid in self._threads() if tid not in done]
            if not fresh:
                return
            for tid in fresh:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    log.debug("sandbox %s: renice %d of thread %d: %s", self.spec.label, nice, tid, exc)
            done.update(fresh)

    def _weigh_cgroup(self, nice: int) -> None:
        # Niceness alone ranks a task only within its own cgroup; against other sessions the
        # cgroup's weight is what counts (see cgroups.NICE_TO_WEIGHT).
        if self._cgroup is None:
            return
        try:
            self._cgroup.weigh_as_nice(nice)
        except OSError as exc:
            log.debug("sandbox %s: cpu weight for niceness %d: %s", self.spec.label, nice, exc)

    def _threads(self) -> list[int]:
        """Thread ids of every live process of the session (a process just spawned included)."""
        if self._cgroup is not None:
            spawned = [p.pid for p in self._processes if p.returncode is None]
            return sorted(set(self._cgroup.threads()) | set(_tasks_of(spawned)))
        return _tasks_of(self.pids())

    def _setpriv(self) -> list[str]:
        uid = str(self.uid)
        return [SETPRIV, "--reuid", uid, "--regid", uid, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]

    def _bwrap_command(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, fds: list[int]) -> list[str]:
        seccomp_fd = seccomp.filter_fd()
        fds.append(seccomp_fd)
        options = bwrap.options(
            home=self._storage.sources.home,
            tmp=self._storage.sources.tmp,
            tmp_size_mb=self.spec.policy.limits.disk_mb,
            binds=self._storage.sources.binds,
            share_net=self.spec.policy.network == "host",
            hostname=self.spec.hostname,
            env=env,
            cwd=cwd or HOME_INSIDE,
            seccomp_fd=seccomp_fd,
            fds=fds,
            etc_files=self._etc_files,
        )
        args_fd = data_fd(bwrap.encode_args(options), "agentflow-bwrap-args")
        fds.append(args_fd)
        return [bwrap.bwrap_path(), "--args", str(args_fd), "--", *argv]

    def _gvisor_command(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> list[str]:
        assert self._gvisor_state is not None
        named = self._storage.named  # runsc resolves these itself, inside the session's mount namespace
        assert named.tmp is not None
        # Unique on the host: runsc names its control socket after the container id, so two
        # servers (or test runs) whose sessions share a label would otherwise collide.
        container_id = f"{self.spec.server_id}-{self.spec.label}-{next(self._counter)}"
        bundle = self._gvisor_state / "bundles" / container_id
        bundle.mkdir(mode=0o700)
        gvisor.write_bundle(
            bundle,
            argv=argv,
            env=env,
            cwd=cwd or HOME_INSIDE,
            uid=self.uid,
            pids=self.spec.policy.limits.pids,
            home=named.home,
            tmp=named.tmp,
            binds=named.binds,
            hostname=self.spec.hostname,
            host_network=self.spec.policy.network == "host",
            etc_files=self._etc_files,
        )
        self._containers.append(container_id)
        network = "host" if self.spec.policy.network == "host" else "none"
        return gvisor.run_argv(self._gvisor_state, bundle, container_id, network=network)

    def _plain_command(self, argv: Sequence[str]) -> list[str]:
        if self.spec.policy.network == "none":
            # No other namespace in this tier, but the policy's network still holds.
            if os.geteuid() == 0:
                return ["unshare", "--net", "--", *argv]
            return ["unshare", "--user", "--map-current-user", "--net", "--", *argv]
        return list(argv)

    # -- membership -----------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every live process of the session (cgroup members, else same uid, else same pid namespace).

        Processes just spawned count too: they join their cgroup a moment after `spawn` returns.
        """
        alive = [p.pid for p in self._processes if p.returncode is None and os.path.exists(f"/proc/{p.pid}")]
        if self._cgroup is not None:
            return sorted(set(alive) | set(self._cgroup.pids()))
        if self._lease is not None:
            return sorted(set(alive) | set(_pids_of_uid(self.uid)))
        if self.tier == "sandbox":
            self._refresh_namespaces()
            return sorted(set(alive) | set(_pids_in_ns(self._namespaces)))
        return alive

    def _refresh_namespaces(self) -> None:
        for process in self._processes:
            inner = self.inner_pid(process)
            if inner is not None and (ns := _pid_ns(inner)):
                self._namespaces.add(ns)

    def inner_pid(self, process: Process) -> int | None:
        """Host pid of the real program under the wrappers (signal this one), None if not started yet.

        `gvisor`: the runsc process itself, which forwards signals to the container's program.
        """
        if self.tier != "sandbox":
            return process.pid
        init = _children(process.pid)
        if not init:
            return None
        program = _children(init[0])
        return program[0] if program else None

    async def wait_inner_pid(self, process: Process, within: float = 10.0) -> int | None:
        """`inner_pid`, polled until the sandbox has started the program (None if it never does)."""
        with anyio.move_on_after(within):
            while process.returncode is None:
                pid = self.inner_pid(process)
                if pid is not None:
                    return pid
                await anyio.sleep(0.001)
        return None

    async def protect(self, process: Process, *, started: bool = False) -> bool:
        """Keep the OOM killer off the session's wrapper processes (bwrap and its pid-1 reaper).

        Returns False when the scores could not be set (lowering one needs CAP_SYS_RESOURCE,
        which some hosts withhold even from root). The program itself keeps the default score:
        `oom_score_adj` is inherited on fork, so lowering it for a shell would shield every
        command the shell runs and leave the memory cgroup with nothing to kill. With equal
        scores the kernel kills the largest process, which is the one that hit the limit; the
        tests check the shell survives that.

        `started`: the caller knows the program runs (it answered), so its init has forked it.
        """
        if self.tier != "sandbox":
            return False
        # The init must have forked the program already: a score set before would be inherited.
        init = _children(process.pid)[:1]
        if not (init and (started or _children(init[0]))):
            if await self.wait_inner_pid(process) is None:
                return False
            init = _children(process.pid)[:1]
        return all(_write_oom_score_adj(pid, -1000) for pid in [process.pid, *init])

    def limit_hits(self) -> dict[str, int]:
        """How often each limit was hit so far (for a 2001 message naming the limit)."""
        if self._cgroup is None:
            return {}
        hits = {"memory_oom_kills": self._cgroup.oom_kills()}
        pids_events = self._cgroup.dirs.get("pids")
        if pids_events is not None:
            with contextlib.suppress(OSError, ValueError):
                text = (pids_events / "pids.events").read_text().split()
                hits["pids_max"] = int(text[text.index("max") + 1])
        return hits

    # -- teardown ---------------------------------------------------------------------

    def kill_now(self) -> None:
        """SIGKILL every process of the session at once, without waiting; `aclose` finishes.

        In `sandbox` each spawn is bwrap (the spawned process, its own process group) over
        the pid namespace's init (bwrap's child, in a group of its own): both get SIGKILL,
        and the init's death makes the kernel kill everything in the namespace, with no
        fork able to race it. Other tiers get one pass over the cgroup's members (`aclose`
        then kills until the cgroup is empty, freezing it first in tier `none`). Never
        raises, never blocks beyond a few system calls: destroy and temporary calls return
        after this, and the reaping, cgroup removal and unmounting run in the background.
        """
        self._closed = True
        self._kill_wrappers()
        if self._cgroup is not None and self.tier != "sandbox":
            cgroups.kill_pids(self._cgroup.pids())

    def _kill_wrappers(self) -> None:
        """SIGKILL each spawn's process group and (tier `sandbox`) its pid namespace's init.

        A pidfd of each init is kept: the kernel ends an init only after every other process
        of its namespace is gone, so its pidfd turning readable says the namespace is empty,
        with no polling of the cgroup.
        """
        if self._wrappers_killed:
            return
        self._wrappers_killed = True
        for process in self._processes:
            # Not once reaped: the pid may name another process by now.
            alive = process.returncode is None
            inits = _children(process.pid) if self.tier == "sandbox" and alive else []
            for pid in inits:
                with contextlib.suppress(OSError):
                    self._init_fds.append(os.pidfd_open(pid))
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.killpg(process.pid, signal.SIGKILL)
            cgroups.kill_pids(inits)

    async def aclose(self) -> None:
        """Kill every process of the session, remove its cgroups and storage, free its uid.

        Idempotent, shielded from cancellation, and never raises (failures are logged).
        """
        if self._closed and self._lease is None and self._cgroup is None and self._storage.stage is None:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._kill_everything()
            except Exception:
                log.exception("sandbox %s: killing its processes failed", self.spec.label)
            try:
                if self._quick_release():
                    self._release()
                else:
                    await anyio.to_thread.run_sync(self._release)
            except Exception:
                log.exception("sandbox %s: releasing its resources failed", self.spec.label)

    async def _kill_everything(self) -> None:
        self._kill_wrappers()
        if self._init_fds:
            await self._await_inits()
            # The wrappers were SIGKILLed with them: reaped, they leave nothing to poll for below.
            await self._reap(within=5)
        if self._cgroup is not None:
            # Only tier `none` needs the freezer against a fork racing the kill. In `sandbox`
            # every process lives in a pid namespace whose init died with its process group
            # (the kernel kills the rest, and no new pid can be made there); gVisor's Sentry
            # runs everything of the session, so killing it cannot be raced by a fork either.
            self._emptied = await self._cgroup.kill_all(freeze=self.tier == "none")
        else:
            with anyio.move_on_after(10):
                while members := self.pids():
                    for pid in members:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
                    await anyio.sleep(0.005)
        await self._reap(within=5)
        # An emptied cgroup stays empty (nothing can join it any more): no second look then.
        if self._cgroup is not None and not self._emptied and self._cgroup.pids():
            self._emptied = await self._cgroup.kill_all()

    async def _reap(self, within: float) -> None:
        for process in self._processes:
            with anyio.move_on_after(within):
                await process.wait()

    async def _await_inits(self) -> None:
        """Wait (bounded) until each killed namespace init has exited, i.e. its namespace is empty."""
        fds, self._init_fds = self._init_fds, []
        try:
            with anyio.move_on_after(5):
                for fd in fds:
                    # Usually gone already (SIGKILL is quick): a poll costs less than a wait.
                    if not select.select([fd], [], [], 0)[0]:
                        await anyio.wait_readable(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def _release(self) -> None:
        if self._gvisor_state is not None:
            # Every runsc process is dead (cgroup), so its state is just files now.
            shutil.rmtree(self._gvisor_state, ignore_errors=True)
            with contextlib.suppress(OSError):
                self._gvisor_state.parent.rmdir()
            self._gvisor_state = None
            self._containers.clear()
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None
        self._storage.release()
        if self._lease is not None:
            # Every process of the uid was in the (now empty) cgroup: the uid can serve again.
            self._lease.release(clean=self._emptied)
            self._lease = None

    # -- reporting --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Tier, uid, cgroup, mechanisms and limits in force (for list_sessions / get_status)."""
        limits = self.spec.policy.limits
        mech = host_mechanisms()
        info: dict[str, Any] = {
            "tier": self.tier,
            "uid": self.uid,
            "uid_private": self._lease is not None,
            "network": self.spec.policy.network,
            "home": self.home_path,
            "limits": limits.model_dump(),
            "disk": (
                f"home and /tmp are tmpfs mounts of {limits.disk_mb} MB each (counted as memory)"
                if self._storage.capped
                else "not capped (server is not root: no tmpfs mounts)"
            ),
        }
        if self._cgroup is not None:
            info["cgroup"] = {
                "version": self._cgroup.host.version,
                "paths": {k: str(v) for k, v in self._cgroup.dirs.items()},
                "limits_in_force": dict(self._cgroup.limits_in_force),
            }
            info["limits_mechanism"] = f"cgroup v{self._cgroup.host.version}"
        else:
            info["limits_mechanism"] = "rlimits (best effort: per process/uid)" if self._rlimit_prefix else "none"
        if self.tier == "sandbox":
            info["mechanisms"] = [
                "bubblewrap",
                "user+pid+ipc+uts+mount+cgroup namespaces",
                "network namespace" if self.spec.policy.network == "none" else "host network",
                "seccomp",
                "no capabilities",
                "--disable-userns" if mech["bwrap"]["disable_userns"] else "seccomp-only userns block",
            ]
        elif self.tier == "gvisor":
            info["mechanisms"] = ["gVisor (runsc, OCI bundle)", f"runsc {gvisor.runsc_version()}"]
        else:
            netns = ["network namespace"] if self.spec.policy.network == "none" else []
            info["mechanisms"] = ["process group", *netns]
        return info


#: (tier, network) pairs this host was found to provide (the host does not change under us).
_TIERS_OK: set[tuple[str, str]] = set()


def _check_tier(tier: str, network: str) -> None:
    _check_tier_once(tier, network)
    _TIERS_OK.add((tier, network))


def _check_tier_once(tier: str, network: str) -> None:
    mech = host_mechanisms()
    if tier == "sandbox":
        if not mech["bwrap"]["path"]:
            raise ConfigurationError("isolation 'sandbox' is unavailable: bubblewrap (bwrap) is not installed")
        if not mech["userns"]["available"]:
            raise ConfigurationError(f"isolation 'sandbox' is unavailable: {mech['userns']['reason']}")
        if os.geteuid() == 0 and launcher.path() is None and not os.path.exists(SETPRIV):
            raise ConfigurationError("isolation 'sandbox' is unavailable: setpriv (util-linux) is missing")
    elif tier == "gvisor":
        if not mech["runsc"]["path"]:
            raise ConfigurationError("isolation 'gvisor' is unavailable: runsc is not installed (apt install runsc)")
        if os.geteuid() != 0:
            raise ConfigurationError("isolation 'gvisor' is unavailable: runsc here needs the server to run as root")
        gvisor.shim_dir()
    check_network(network, tier)
