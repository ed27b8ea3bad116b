"""Session start and stop costs with the default isolation tier (`sandbox`): where a start spends
its time, temporary calls, create+destroy, 50 concurrent creates; in-process and over HTTP, with
the warm pool off (0) and at the manifest's default size.

Prints a calibration first (a 1M-iteration Python loop, a pipe round trip to a live `cat`) so
runs on different days, or beside other load, compare. Prints; asserts nothing. Run as root:

    python bench/bench_starts.py [--quick] [--pools 0,2,8] [--no-http]

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

from backends.bash.shell import PersistentShell
from backends.policy import Limits, Policy
from backends.sandbox import SandboxSpec, SessionSandbox
from bench._common import http_server, loop_ms, measure, pipe_round_trip_us, summarize
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


async def breakdown(n: int) -> None:
    """One sandboxed shell at a time, each step timed (SessionSandbox and PersistentShell directly)."""
    out("\n== one sandboxed bash start and stop, step by step (sandbox tier) ==")
    server_id = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
    steps: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append((now - t0) * 1000)
        return now

    with tempfile.TemporaryDirectory(prefix=f"agentflow-{server_id}-") as tmp:
        for i in range(n + 3):
            cpu0 = time.process_time()
            t0 = start = time.perf_counter()
            home = Path(tmp) / f"s{i}" / "home"
            spec = SandboxSpec(label=f"s{i}", policy=POLICY, server_id=server_id, home=home)
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
    for name, samples in steps.items():
        summarize(name, samples[3:])


# -- engine-level figures ------------------------------------------------------------


@contextmanager
def manifest_with_pool(pool: int) -> Iterator[str]:
    text = DEFAULT_MANIFEST.read_text()
    text, count = re.subn(r"(?m)^pool = \d+", f"pool = {pool}", text)
    assert count == 1, "default manifest has no bash pool line"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(text)
    try:
        yield fh.name
    finally:
        os.unlink(fh.name)


async def settle(status: Callable[[], Awaitable[object]], pool: int) -> None:
    """Wait (bounded) until the bash pool is full, so every run starts from the same state."""
    if pool == 0:
        return
    with anyio.move_on_after(20):
        while True:
            result = await status()
            data = result.get("data", result) if isinstance(result, dict) else {}
            ready = (data.get("warm_pools") or {}).get("bash", {}).get("ready", pool)
            if ready >= pool:
                return
            await anyio.sleep(0.05)


def cpu_ms(pid: int | None) -> float:
    """CPU time (user+system, ms) of a server process, or of this process when `pid` is None."""
    if pid is None:
        return time.process_time() * 1000
    times = psutil.Process(pid).cpu_times()
    return (times.user + times.system) * 1000


async def client_figures(sandbox: Sandbox, label: str, n: int, pool: int, server_pid: int | None = None) -> None:
    """Temporary calls and create+destroy, back to back; with the server's CPU per operation,
    which a loaded machine inflates far less than wall-clock time."""
    await settle(sandbox.get_status, pool)
    whose = "server" if server_pid else "process"

    async def temporary() -> None:
        result = await sandbox.execute("bash:run", {"command": ":"})
        assert result["code"] == 0, result

    async def create_destroy() -> None:
        await sandbox.create_session("bash")
        await sandbox.destroy_session("bash")

    cpu0 = cpu_ms(server_pid)
    summarize(f"{label}, pool={pool}: temporary bash_run ':'", await measure(temporary, n, 3))
    out(f"{f'  {whose} CPU per temporary call':<58} {(cpu_ms(server_pid) - cpu0) / (n + 3):8.2f} ms")
    await settle(sandbox.get_status, pool)
    cpu0 = cpu_ms(server_pid)
    summarize(f"{label}, pool={pool}: create_session + destroy_session", await measure(create_destroy, n, 3))
    out(f"{f'  {whose} CPU per create+destroy':<58} {(cpu_ms(server_pid) - cpu0) / (n + 3):8.2f} ms")
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
) -> None:
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(create, i)
    wall = (time.perf_counter() - t0) * 1000
    out(f"{label:<58} wall {wall:8.1f} ms")
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(destroy, i)


async def in_process(n: int, pools: list[int]) -> None:
    out("\n== in-process Sandbox() (sandbox tier) ==")
    for pool in pools:
        with manifest_with_pool(pool) as manifest:
            async with Sandbox(manifest=manifest) as sandbox:
                await client_figures(sandbox, "in-process", n, pool)
            async with engine_from_manifest(load_manifest(manifest)) as engine:

                async def status(engine: Engine = engine) -> object:
                    return engine.status()

                await settle(status, pool)

                async def create(i: int, engine: Engine = engine) -> None:
                    await engine.create_sessions(Caller(worker=f"burst-{i}"), "bash")

                async def destroy(i: int, engine: Engine = engine) -> None:
                    await engine.destroy_sessions(Caller(worker=f"burst-{i}"), ["bash"])

                await concurrent_creates(create, destroy, f"in-process engine, pool={pool}: 8 concurrent create", 8)
                await settle(status, pool)
                await concurrent_creates(create, destroy, f"in-process engine, pool={pool}: 50 concurrent create")


async def over_http(n: int, pools: list[int]) -> None:
    out("\n== streamable HTTP (2026-07-28, Sandbox(url=...)) ==")
    for pool in pools:
        with manifest_with_pool(pool) as manifest, http_server(manifest) as served:
            async with Sandbox(url=served.url, token=served.token) as sandbox:
                await client_figures(sandbox, "HTTP", n, pool, served.pid)
            clients = [Sandbox(url=served.url, token=served.token) for _ in range(50)]
            for client in clients:
                await client.start()
            # One call each first: a client's first request pays for its connection and
            # handshake, which is not what a create costs.
            async with anyio.create_task_group() as tg:
                for client in clients:
                    tg.start_soon(client.list_sessions)
            await settle(clients[0].get_status, pool)

            async def create(i: int, clients=clients) -> None:
                await clients[i].create_session("bash")

            async def destroy(i: int, clients=clients) -> None:
                await clients[i].destroy_session("bash")

            await concurrent_creates(create, destroy, f"HTTP, pool={pool}: 8 concurrent create_session", 8)
            await settle(clients[0].get_status, pool)
            await concurrent_creates(create, destroy, f"HTTP, pool={pool}: 50 concurrent create_session")
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

            async def status(engine: Engine = engine) -> object:
                return engine.status()

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


async def main(quick: bool, pools: list[int], http: bool) -> None:
    n = 60 if quick else 200
    calibration()
    await breakdown(10 if quick else 30)
    await pool_memory(16)
    await in_process(n, pools)
    if http:
        await over_http(n, pools)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--pools", default="0,8", help="bash pool sizes to measure (comma-separated)")
    parser.add_argument("--no-http", action="store_true", help="in-process figures only")
    args = parser.parse_args()
    anyio.run(main, args.quick, [int(p) for p in args.pools.split(",")], not args.no_http)
