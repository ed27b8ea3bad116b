"""Session start and stop costs with the default isolation tier (`sandbox`): where a start spends
its time, temporary calls, create+destroy, 50 concurrent creates; in-process and over HTTP, with
the warm pool off (0) and at the manifest's default size.

The warm pool grows after demand (manifest `pool_max`): rows name the pool's state when they
start (target/ready). The 50-create burst runs twice: first with the pool at its base, then,
after the pool has grown to the first burst's size (the growth's time and CPU are printed),
again. In-process, a burst with the refill not deferred (what the pool did before) runs beside
one with the default deferral, on a pool that does not grow.

Prints a calibration first (a 1M-iteration Python loop, a pipe round trip to a live `cat`) so
runs on different days, or beside other load, compare. Prints; asserts nothing. Run as root:

    python bench/bench_starts.py [--quick] [--pools 0,2,8] [--no-http] [--live 0,200] [--only-live]

`BENCH_TREE=/other/checkout` (with the working directory there too) measures another tree's
code with this script, for a before/after in one sitting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil

sys.path.insert(0, os.environ.get("BENCH_TREE") or str(Path(__file__).resolve().parent.parent))

from backends.bash.backend import POOL_NICE
from backends.bash.shell import PersistentShell
from backends.policy import Limits, Policy
from backends.sandbox import SandboxSpec, SessionSandbox
from bench._common import Served, http_server, loop_ms, measure, pipe_round_trip_us, summarize
from manifests import load_manifest
from mcp_server.factory import engine_from_manifest
from sandbox import Sandbox
from session.engine import Engine
from session.models import Caller
from tests.support import procs

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "default.toml"
# What the bash backend starts (the sandbox resets signal dispositions itself; BENCH_TREE of an
# older tree that still wrapped the shell in `env --default-signal=INT` measures one exec less).
SHELL = ["/bin/bash", "--noprofile", "--norc"]
POLICY = Policy(isolation="sandbox", network="none", limits=Limits(pids=512, memory_mb=2048, disk_mb=1024, cpu=1.0))


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- calibration ---------------------------------------------------------------------


def calibration() -> None:
    out("== calibration ==")
    out(f"{'python loop, 1M iterations':<58} best {min(loop_ms() for _ in range(3)):8.1f} ms")
    out(f"{'pipe round trip to a live `cat`, median':<58} {pipe_round_trip_us():8.1f} µs")
    out(f"{'load average (1 min)':<58} {os.getloadavg()[0]:8.2f}")


# -- where a start spends its time ---------------------------------------------------


async def breakdown(n: int, nice: int = 0) -> None:
    """One sandboxed shell at a time, each step timed (SessionSandbox and PersistentShell directly)."""
    how = f"as a pool member (SandboxSpec.nice={nice})" if nice else "sandbox tier"
    out(f"\n== one sandboxed bash start and stop, step by step ({how}) ==")
    server_id = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
    steps: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append((now - t0) * 1000)
        return now

    with tempfile.TemporaryDirectory(prefix=f"agentflow-{server_id}-") as tmp:
        before = os.times()
        for i in range(n + 3):
            cpu0 = time.process_time()
            t0 = start = time.perf_counter()
            home = Path(tmp) / f"s{i}" / "home"
            spec = SandboxSpec(label=f"s{i}", policy=POLICY, server_id=server_id, home=home, nice=nice)
            box = await SessionSandbox.create(spec)
            t0 = lap("sandbox create (uid, cgroups, tmpfs home+tmp)", t0)
            shell = PersistentShell(
                box,
                argv=SHELL,
                env={"PATH": "/usr/bin:/bin", "HOME": box.home_path},
                cwd=None,
                max_output_bytes=1 << 20,
            )
            await shell.start()
            t0 = lap("shell start (spawn chain + first round trip)", t0)
            lap("  = start total", start)
            server_cpu = (time.process_time() - cpu0) * 1000
            steps.setdefault("  server CPU of the start (this process)", []).append(server_cpu)
            t0 = time.perf_counter()
            await shell.run(":", 10)
            t0 = lap("one command ':'", t0)
            cpu0 = time.process_time()
            shell.signal_kill() if hasattr(shell, "signal_kill") else None
            box.kill_now() if hasattr(box, "kill_now") else None
            t0 = lap("kill (what a destroy waits for)", t0)
            await shell.kill()
            await box.aclose()
            lap("reap + rmdir cgroups + unmount (background after kill)", t0)
            # Worker threads included: the removal of cgroups and mounts runs in one.
            steps.setdefault("  server CPU of the stop (this process)", []).append((time.process_time() - cpu0) * 1000)
        # Every spawn chain is reaped by now: its CPU (and that of the sandbox's init and bash,
        # reaped by bwrap) is in this process's children times, which tick in 10 ms: a mean.
        after = os.times()
        spent = after.children_user + after.children_system - before.children_user - before.children_system
    for name, samples in steps.items():
        summarize(name, samples[3:])
    out(f"{'  children CPU per start+command+stop (chain, bash), mean':<58} {spent * 1000 / (n + 3):8.2f} ms")


async def _start_shell(server_id: str, tmp: str, label: str) -> tuple[SessionSandbox, PersistentShell]:
    home = Path(tmp) / label / "home"
    box = await SessionSandbox.create(SandboxSpec(label=label, policy=POLICY, server_id=server_id, home=home))
    shell = PersistentShell(
        box, argv=SHELL, env={"PATH": "/usr/bin:/bin", "HOME": box.home_path}, cwd=None, max_output_bytes=1 << 20
    )
    await shell.start()
    return box, shell


async def _stop_shell(box: SessionSandbox, shell: PersistentShell) -> None:
    await shell.kill()
    await box.aclose()


def host_mounts() -> int:
    with open("/proc/self/mountinfo") as fh:
        return sum(1 for _ in fh)


async def burst_of_starts(server_id: str, tmp: str, prefix: str, label: str, count: int = 50) -> None:
    started: list[tuple[SessionSandbox, PersistentShell]] = []

    async def start(i: int) -> None:
        started.append(await _start_shell(server_id, tmp, f"{prefix}-{i}"))

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(start, i)
    out(f"{label:<58} wall {(time.perf_counter() - t0) * 1000:8.1f} ms")
    async with anyio.create_task_group() as tg:
        for pair in started:
            tg.start_soon(_stop_shell, *pair)


async def live_sessions(counts: list[int], n: int) -> None:
    """Starts beside many live sessions: each sandbox start copies the mounts of the namespace it
    starts from, so a session's mounts must not be where other sessions start from."""
    out("\n== sandboxed bash starts beside live sessions ==")
    server_id = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix=f"agentflow-{server_id}-") as tmp:
        for count in counts:
            live = []
            for i in range(count):
                live.append(await _start_shell(server_id, tmp, f"live{count}-{i}"))
            label = f"{count} live sessions ({host_mounts()} host mounts)"
            samples = []
            for i in range(n):
                t0 = time.perf_counter()
                started = await _start_shell(server_id, tmp, f"one{count}-{i}")
                samples.append((time.perf_counter() - t0) * 1000)
                await _stop_shell(*started)
            summarize(f"{label}: one start", samples)
            for rep in range(2):
                await burst_of_starts(server_id, tmp, f"burst{count}-{rep}", f"{label}: 50 concurrent starts")
            async with anyio.create_task_group() as tg:
                for started in live:
                    tg.start_soon(_stop_shell, *started)


# -- engine-level figures ------------------------------------------------------------


@contextmanager
def manifest_with_pool(pool: int, pool_max: int | None = None) -> Iterator[str]:
    """The default manifest with the bash pool's base (and cap, if given; none without a pool)."""
    text = DEFAULT_MANIFEST.read_text()
    text, count = re.subn(r"(?m)^pool = \d+", f"pool = {pool}", text)
    assert count == 1, "default manifest has no bash pool line"
    cap = "" if pool == 0 else f"pool_max = {max(pool_max, pool)}" if pool_max is not None else None
    if cap is not None:
        text, count = re.subn(r"(?m)^pool_max = \d+", cap, text)
        assert count == 1, "default manifest has no bash pool_max line"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(text)
    try:
        yield fh.name
    finally:
        os.unlink(fh.name)


Status = Callable[[], Awaitable[object]]


async def pool_status(status: Status) -> dict[str, Any]:
    result = await status()
    data = result.get("data", result) if isinstance(result, dict) else {}
    return dict((data.get("warm_pools") or {}).get("bash", {}))


def pool_state(pool: dict[str, Any]) -> str:
    return f"target {pool['target']}, ready {pool['ready']}" if pool else "no pool"


async def settle(status: Status, pool: int) -> str:
    """Wait (bounded) until the bash pool holds its current target (it may have grown), so
    every run starts from a known state; returns that state."""
    if pool == 0:
        return "no pool"
    state: dict[str, Any] = {}
    with anyio.move_on_after(30):
        while True:
            state = await pool_status(status)
            if state["ready"] >= state["target"] and not state["starting"]:
                break
            await anyio.sleep(0.05)
    return pool_state(state)


def machine_cpu_ms() -> float:
    """Busy CPU time of the whole machine (every process, this run's and any other load), ms."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    return busy * 1000 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int | None) -> float:
    """CPU time (user+system, ms) of a server process, or of this process when `pid` is None."""
    if pid is None:
        return time.process_time() * 1000
    times = psutil.Process(pid).cpu_times()
    return (times.user + times.system) * 1000


def context_switches(pid: int | None) -> int:
    """Context switches (voluntary and not) of every thread of a server process, or of this one.

    Each is a thread going to sleep or being preempted; a handoff to another CPU costs a
    wakeup through the hypervisor on a VM (~20 us here): why session setup stays off worker threads.
    """
    total = 0
    for task in Path(f"/proc/{pid or os.getpid()}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if "ctxt_switches:" in line:
                total += int(line.split(":")[1])
    return total


async def client_figures(sandbox: Sandbox, label: str, n: int, pool: int, server_pid: int | None = None) -> None:
    """Temporary calls and create+destroy, back to back; with the server's CPU per operation,
    which a loaded machine inflates far less than wall-clock time. Back-to-back calls are
    demand: the pool grows while the first row runs, so the later rows meet a larger pool."""
    whose = "server" if server_pid else "process"

    async def temporary() -> None:
        result = await sandbox.execute("bash:run", {"command": ":"})
        assert result["code"] == 0, result

    async def create_destroy() -> None:
        await sandbox.create_session("bash")
        await sandbox.destroy_session("bash")

    rows = [("temporary bash_run ':'", temporary), ("create_session + destroy_session", create_destroy)]
    if pool:
        rows.append(("temporary bash_run ':', again", temporary))
    for name, fn in rows:
        state = await settle(sandbox.get_status, pool)
        out(f"  (pool: {state})")
        cpu0, switches0 = cpu_ms(server_pid), context_switches(server_pid)
        summarize(f"{label}, pool={pool}: {name}", await measure(fn, n, 3))
        out(f"{f'  {whose} CPU per call':<58} {(cpu_ms(server_pid) - cpu0) / (n + 3):8.2f} ms")
        switches = (context_switches(server_pid) - switches0) / (n + 3)
        out(f"{f'  {whose} context switches per call':<58} {switches:8.1f}")
    await settle(sandbox.get_status, pool)
    # A burst the pool can cover, spaced so the pool refills in between (what a pool is for).
    if pool:
        spaced = []
        for _ in range(n // 2):
            await settle(sandbox.get_status, pool)
            t0 = time.perf_counter()
            await temporary()
            spaced.append((time.perf_counter() - t0) * 1000)
        summarize(f"{label}, pool={pool}: temporary, pool refilled before each", spaced)


async def concurrent_creates(
    create: Callable[[int], Coroutine[Any, Any, None]],
    destroy: Callable[[int], Coroutine[Any, Any, None]],
    label: str,
    count: int = 50,
) -> float:
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(create, i)
    wall = (time.perf_counter() - t0) * 1000
    out(f"{label:<58} wall {wall:8.1f} ms")
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(destroy, i)
    return wall


async def bursts(
    create: Callable[[int], Coroutine[Any, Any, None]],
    destroy: Callable[[int], Coroutine[Any, Any, None]],
    status: Status,
    label: str,
    pool: int,
    server_pid: int | None = None,
) -> None:
    """8 concurrent creates, then a 50-create burst with the pool at its base, the pool's growth
    (timed, with its CPU), and a second 50-create burst on the grown pool."""
    await settle(status, pool)
    await concurrent_creates(create, destroy, f"{label}, pool={pool}: 8 concurrent create", 8)
    state = await settle(status, pool)
    await concurrent_creates(create, destroy, f"{label}, pool={pool}: 50 concurrent create, 1st ({state})")
    if not pool:
        return
    t0, machine0, server0 = time.perf_counter(), machine_cpu_ms(), cpu_ms(server_pid)
    state = await settle(status, pool)
    wall = (time.perf_counter() - t0) * 1000
    machine, server = machine_cpu_ms() - machine0, cpu_ms(server_pid) - server0
    out(
        f"  the pool grew to {state} in {wall:.0f} ms (incl. the burst's background cleanups): "
        f"server CPU {server:.0f} ms, machine CPU {machine:.0f} ms (every process)"
    )
    await concurrent_creates(create, destroy, f"{label}, pool={pool}: 50 concurrent create, 2nd ({state})")


BurstCall = Callable[[int], Coroutine[Any, Any, None]]


def burst_calls(engine: Engine) -> tuple[BurstCall, BurstCall, Status]:
    """Create and destroy for burst worker `i`, and the status call, straight on an engine."""

    async def create(i: int) -> None:
        await engine.create_sessions(Caller(worker=f"burst-{i}"), "bash")

    async def destroy(i: int) -> None:
        await engine.destroy_sessions(Caller(worker=f"burst-{i}"), ["bash"])

    async def status() -> object:
        return engine.status()

    return create, destroy, status


async def deferral(pool: int, reps: int) -> None:
    """A 50-create burst on a pool that does not grow (pool_max = pool): refill deferred while
    more create/temporary calls than cores are in flight (the default) or not at all."""
    with manifest_with_pool(pool, pool) as manifest:
        async with engine_from_manifest(load_manifest(manifest)) as engine:
            create, destroy, status = burst_calls(engine)

            default = engine.refill_defer_above
            walls: dict[str, list[float]] = {"deferred": [], "not deferred": []}
            for _ in range(reps):
                for mode, above in (("deferred", default), ("not deferred", 1 << 30)):
                    engine.refill_defer_above = above
                    await settle(status, pool)
                    await anyio.sleep(0.2)  # the previous burst's background cleanups
                    walls[mode].append(await concurrent_creates(create, destroy, f"  {mode}, one run"))
            for mode, samples in walls.items():
                summarize(f"in-process engine, fixed pool={pool}: 50 concurrent, refill {mode}", samples)


async def in_process(n: int, pools: list[int]) -> None:
    out("\n== in-process Sandbox() (sandbox tier) ==")
    for pool in pools:
        with manifest_with_pool(pool) as manifest:
            async with Sandbox(manifest=manifest) as sandbox:
                await client_figures(sandbox, "in-process", n, pool)
            async with engine_from_manifest(load_manifest(manifest)) as engine:
                create, destroy, status = burst_calls(engine)

                await bursts(create, destroy, status, "in-process engine", pool)
        if pool:
            await deferral(pool, 3)


async def over_http(n: int, pools: list[int]) -> None:
    out("\n== streamable HTTP (2026-07-28, Sandbox(url=...)) ==")
    for pool in pools:
        with manifest_with_pool(pool) as manifest:
            with http_server(manifest) as served:
                async with Sandbox(url=served.url, token=served.token) as sandbox:
                    await client_figures(sandbox, "HTTP", n, pool, served.pid)
            # A server of its own, so the bursts start with the pool at its base (the calls
            # above grew it).
            with http_server(manifest) as served:
                await http_bursts(served, pool)


async def http_bursts(served: Served, pool: int) -> None:
    """The bursts of `bursts`, each create from its own `Sandbox(url)` client (its own worker)."""
    clients = [Sandbox(url=served.url, token=served.token) for _ in range(50)]
    for client in clients:
        await client.start()
    # One call each first: a client's first request pays for its connection and
    # handshake, which is not what a create costs.
    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(client.list_sessions)

    async def create(i: int) -> None:
        await clients[i].create_session("bash")

    async def destroy(i: int) -> None:
        await clients[i].destroy_session("bash")

    try:
        await bursts(create, destroy, clients[0].get_status, "HTTP", pool, served.pid)
    finally:
        for client in reversed(clients):
            await client.close()


def memory_charged_kb(member: object) -> int:
    """What the session's memory cgroup is charged (its pages, kernel memory where accounted, tmpfs)."""
    info = member.state.sandbox.describe()  # type: ignore[attr-defined]
    path = info.get("cgroup", {}).get("paths", {}).get("memory")
    if not path:
        return 0
    for name in ("memory.usage_in_bytes", "memory.current"):
        with contextlib.suppress(OSError, ValueError):
            return int((Path(path) / name).read_text()) // 1024
    return 0


def mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


async def pool_memory(size: int) -> None:
    """What idle pooled shells cost: their processes' PSS, and the host's MemAvailable drop."""
    out(f"\n== memory of {size} idle pooled shells (sandbox tier) ==")
    with manifest_with_pool(size) as manifest:
        before = mem_available_kb()
        async with engine_from_manifest(load_manifest(manifest)) as engine:
            _, _, status = burst_calls(engine)
            await settle(status, size)
            await anyio.sleep(0.5)
            after = mem_available_kb()
            members = list(engine.warm["bash"].ready)
            pss = sum(procs.pss_kb(member.state.sandbox.pids()) for member in members)
            out(f"{'PSS of a pooled shell (bwrap, its init, bash)':<58} {pss / max(len(members), 1):8.0f} kB")
            charged = [memory_charged_kb(member) for member in members]
            average = sum(charged) / max(len(charged), 1)
            out(f"{'memory cgroup usage of a pooled shell (incl. kernel)':<58} {average:8.0f} kB")
            out(f"{'host MemAvailable drop per pooled shell (noisy)':<58} {(before - after) / size:8.0f} kB")


async def main(quick: bool, pools: list[int], http: bool, live: list[int]) -> None:
    n = 60 if quick else 200
    calibration()
    await breakdown(10 if quick else 30)
    await breakdown(10 if quick else 30, nice=POOL_NICE)
    if live:
        await live_sessions(live, 10 if quick else 30)
    await pool_memory(16)
    await in_process(n, pools)
    if http:
        await over_http(n, pools)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--pools", default="0,8", help="bash pool sizes to measure (comma-separated)")
    parser.add_argument("--no-http", action="store_true", help="in-process figures only")
    parser.add_argument("--live", default="0,200", help="live session counts to start beside ('' skips)")
    parser.add_argument("--only-live", action="store_true", help="calibration and the live-sessions section only")
    args = parser.parse_args()
    live = [int(c) for c in args.live.split(",") if c]
    if args.only_live:
        calibration()
        anyio.run(live_sessions, live, 10 if args.quick else 30)
    else:
        anyio.run(main, args.quick, [int(p) for p in args.pools.split(",")], not args.no_http, live)
