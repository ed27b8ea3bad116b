"""Core figures against issue 11's targets: per-call latency by transport, server CPU, temporary
sessions, create+destroy, concurrent creates, throughput, memory.

Run: python bench/bench_core.py [--quick]   (prints; asserts nothing)

Every figure is printed next to its target and the original server's figure from the issue's
table (one run on this machine), so a reader sees pass or miss at once. Wall-clock figures on a
shared 2-core machine are noisy: the calibration lines at the top (a plain Python loop, a pipe
round trip) say how busy the machine was, so runs on different days can be compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    Served,
    auth_headers,
    http_server,
    loop_ms,
    measure,
    official_client,
    percentile,
    pipe_round_trip_us,
    rss_kb,
    session_memory,
    structured,
    worker_meta,
)
from manifests import load_manifest
from sandbox import Sandbox

STDIO = [sys.executable, "-m", "mcp_server", "serve", "--log-level", "WARNING"]
RUN = ("bash_run", {"command": ":"})


@dataclass(frozen=True)
class Target:
    """A bound from the issue: `value <= limit` (or `>=` when `at_least`)."""

    limit: float
    at_least: bool = False
    text: str = ""

    def verdict(self, value: float) -> str:
        ok = value >= self.limit if self.at_least else value <= self.limit
        bound = self.text or f"{'>=' if self.at_least else '<='} {self.limit:g}"
        return f"target {bound}: {'pass' if ok else 'MISS'}"


def row(
    label: str, value: float, unit: str, *, target: Target | None = None, original: str = "", extra: str = ""
) -> None:
    """One figure: value, then the issue's target (pass/MISS) and the original server's figure."""
    parts = [f"{label:<56} {value:9.3f} {unit:<7}"]
    if extra:
        parts.append(extra)
    if target is not None:
        parts.append(target.verdict(value))
    if original:
        parts.append(f"original {original}")
    sys.stdout.write("   ".join(parts) + "\n")
    sys.stdout.flush()


def section(title: str) -> None:
    sys.stdout.write(f"\n== {title} ==\n")


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


# -- calibration -------------------------------------------------------------------------


async def calibration() -> None:
    section("calibration (compare runs by these)")
    row("1M-iteration Python loop", loop_ms(), "ms")
    row("pipe round trip to a live cat, median", pipe_round_trip_us(), "us")
    bash = load_manifest(None).enabled()["bash"]
    policy = bash.policy or {}
    sys.stdout.write(
        f"servers run the packaged default manifest: bash isolation {policy.get('isolation', 'sandbox')!r}, "
        f"network {policy.get('network', 'none')!r}, warm pool {bash.pool}\n"
    )


async def health_p50(served: Served, n: int) -> float:
    async with httpx.AsyncClient() as http:
        url = f"{served.base}/health"

        async def get() -> None:
            (await http.get(url)).raise_for_status()

        return p50(await measure(get, n))


# -- one call at a time, by transport ----------------------------------------------------


async def client_calls(call: Callable[[str, dict[str, Any]], Awaitable[Any]], n: int) -> dict[str, float]:
    """p50s of an explicit bash_run, a trivial meta-tool, a temporary call, create+destroy; `call` has a worker."""

    async def run_explicit() -> None:
        await call(*RUN)

    async def listing() -> None:
        await call("list_sessions", {})

    await call("create_session", {"resource": "bash"})
    explicit = await measure(run_explicit, n)
    meta = await measure(listing, n)
    await call("destroy_session", {})
    few = max(n // 4, 30)
    temporary = await measure(run_explicit, few)

    async def create_destroy() -> None:
        await call("create_session", {"resource": "bash"})
        await call("destroy_session", {})

    cycle = await measure(create_destroy, few)
    return {"explicit": p50(explicit), "list": p50(meta), "temporary": p50(temporary), "create_destroy": p50(cycle)}


def sandbox_call(sandbox: Sandbox) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
    async def call(name: str, args: dict[str, Any]) -> Any:
        envelope = await sandbox.execute(name, args)
        if envelope.get("code") != 0:
            raise RuntimeError(f"{name} failed: {envelope}")
        return envelope

    return call


async def per_transport(served: Served, n: int) -> None:
    section("one call at a time (p50), default manifest and isolation tier")
    health = await health_p50(served, n)
    row("GET /health round trip (httpx2, keep-alive)", health, "ms", original="0.92 ms (its own floor)")

    async with Sandbox() as sandbox:
        await anyio.sleep(1)  # let the warm pool fill before timing
        local = await client_calls(sandbox_call(sandbox), n)
    row("in-process Sandbox(): explicit bash_run ':'", local["explicit"], "ms", target=Target(0.35))
    row("in-process Sandbox(): list_sessions", local["list"], "ms", target=Target(0.21))
    row("in-process Sandbox(): temporary bash_run", local["temporary"], "ms", original="4.52 ms (ours, issue)")
    row("in-process Sandbox(): create+destroy", local["create_destroy"], "ms", original="3.71 ms (ours, issue)")

    async with Sandbox(command=STDIO) as sandbox:
        await anyio.sleep(1)
        stdio = await client_calls(sandbox_call(sandbox), n)
    row(
        "stdio Sandbox(command): explicit bash_run",
        stdio["explicit"],
        "ms",
        target=Target(1.90, text="< 1.90 (ahead of original)"),
        original="1.90 ms",
    )
    row(
        "stdio Sandbox(command): temporary bash_run",
        stdio["temporary"],
        "ms",
        target=Target(4.72, text="< 4.72"),
        original="4.72 ms",
    )
    row(
        "stdio Sandbox(command): create+destroy",
        stdio["create_destroy"],
        "ms",
        target=Target(4.17, text="< 4.17"),
        original="4.17 ms",
    )
    row("stdio Sandbox(command): list_sessions", stdio["list"], "ms")

    for label, mode in (
        ("HTTP 2026-07-28 (official client)", "auto"),
        ("HTTP handshake (official client)", "legacy"),
    ):
        async with official_client(served, mode) as client:  # type: ignore[arg-type]
            meta = worker_meta()

            async def call(name: str, args: dict[str, Any], client: Any = client, meta: Any = meta) -> Any:
                return structured(await client.call_tool(name, args, meta=meta))

            await call("create_session", {"resource": "bash"})
            await measure(lambda: call(*RUN), 20)
            cpu0 = served.cpu_seconds()
            explicit = await measure(lambda: call(*RUN), n, warmup=0)
            cpu_per_call = (served.cpu_seconds() - cpu0) / n * 1000
            await call("destroy_session", {})
            few = max(n // 4, 30)
            temporary = await measure(lambda: call(*RUN), few)

            async def create_destroy(call: Callable[..., Awaitable[Any]] = call) -> None:
                await call("create_session", {"resource": "bash"})
                await call("destroy_session", {})

            cycle = await measure(create_destroy, few)
        ratio = p50(explicit) / health
        row(
            f"{label}: explicit bash_run",
            p50(explicit),
            "ms",
            extra=f"= {ratio:.2f}x /health",
            original="1.90 ms (2.1x its /health)",
        )
        row(f"{label}: bash_run / health", ratio, "x", target=Target(1.5) if mode == "auto" else None, original="2.1x")
        row(
            f"{label}: server CPU/call",
            cpu_per_call,
            "ms",
            target=Target(0.5) if mode == "auto" else None,
            original="~0.74 ms",
        )
        row(
            f"{label}: temporary bash_run",
            p50(temporary),
            "ms",
            target=Target(3.8, text="<= 3.8 (0.8x original)"),
            original="4.72 ms",
        )
        row(
            f"{label}: create+destroy",
            p50(cycle),
            "ms",
            target=Target(3.3, text="<= 3.3 (0.8x original)"),
            original="4.17 ms",
        )

    async with Sandbox(url=served.url, token=served.token) as sandbox:
        http = await client_calls(sandbox_call(sandbox), n)
    row(
        "HTTP Sandbox(url): explicit bash_run",
        http["explicit"],
        "ms",
        extra=f"= {http['explicit'] / health:.2f}x /health",
    )
    row("HTTP Sandbox(url): list_sessions", http["list"], "ms")
    row(
        "HTTP Sandbox(url): temporary bash_run",
        http["temporary"],
        "ms",
        target=Target(3.8, text="<= 3.8"),
        original="4.72 ms",
    )
    row(
        "HTTP Sandbox(url): create+destroy",
        http["create_destroy"],
        "ms",
        target=Target(3.3, text="<= 3.3"),
        original="4.17 ms",
    )


# -- concurrency -------------------------------------------------------------------------


async def concurrent_creates(served: Served, workers: int, rounds: int) -> None:
    section(f"{workers} concurrent create_session over HTTP (each worker one session, all at once)")
    walls: list[float] = []
    pools: list[str] = []
    async with AsyncExitStack() as stack:
        sandboxes = [
            await stack.enter_async_context(Sandbox(url=served.url, token=served.token)) for _ in range(workers)
        ]
        for _ in range(rounds):
            await anyio.sleep(1.0)  # the warm pool refills between rounds, as it would between bursts
            # The pool grows after bursts (the throughput run's creates were one): say what each round met.
            bash = ((await sandboxes[0].get_status()).get("warm_pools") or {}).get("bash") or {}
            pools.append(f"{bash.get('ready', 0)}/{bash.get('target', 0)}")
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for sandbox in sandboxes:
                    tg.start_soon(sandbox.create_session, "bash")
            walls.append((time.perf_counter() - t0) * 1000)
            async with anyio.create_task_group() as tg:
                for sandbox in sandboxes:
                    tg.start_soon(sandbox.destroy_session)
    row(
        f"{workers} concurrent create_session, wall p50 of {rounds}",
        p50(walls),
        "ms",
        target=Target(105),
        original="105 ms",
        extra=f"(rounds: {', '.join(f'{w:.0f}' for w in walls)} ms; pool ready/target before each: {', '.join(pools)})",
    )


async def throughput_sandbox(served: Served, workers: int, calls: int) -> None:
    latencies: list[float] = []

    async def worker(sandbox: Sandbox) -> None:
        for _ in range(calls):
            t0 = time.perf_counter()
            result = await sandbox.execute("bash:run", {"command": "echo hi"})
            latencies.append((time.perf_counter() - t0) * 1000)
            if result["code"] != 0:
                raise RuntimeError(result)

    async with AsyncExitStack() as stack:
        sandboxes = [
            await stack.enter_async_context(Sandbox(url=served.url, token=served.token)) for _ in range(workers)
        ]
        created_at = time.perf_counter()
        async with anyio.create_task_group() as tg:  # the sessions first: their starts are measured apart
            for sandbox in sandboxes:
                tg.start_soon(sandbox.create_session, "bash")
        cpu0, t0 = served.cpu_seconds(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for sandbox in sandboxes:
                tg.start_soon(worker, sandbox)
        elapsed, cpu = time.perf_counter() - t0, served.cpu_seconds() - cpu0
        with_creates = time.perf_counter() - created_at
    total = workers * calls
    label = f"Sandbox(url), {workers}x{calls}"
    row(f"{label}: calls/s", total / elapsed, "calls/s", target=Target(2000, at_least=True), original="1094 calls/s")
    row(f"{label}: calls/s incl. creating the sessions", total / with_creates, "calls/s")
    row(f"{label}: p50 latency", p50(latencies), "ms")
    row(f"{label}: p95 latency", percentile(latencies, 0.95), "ms", target=Target(50, text="< 50"))
    row(f"{label}: server CPU per call", cpu / total * 1000, "ms", original="~0.74 ms")


async def throughput_official(served: Served, workers: int, calls: int) -> None:
    latencies: list[float] = []

    metas = [worker_meta() for _ in range(workers)]

    async def create(client: Any, meta: Any) -> None:
        structured(await client.call_tool("create_session", {"resource": "bash"}, meta=meta))

    async def destroy(client: Any, meta: Any) -> None:
        structured(await client.call_tool("destroy_session", {}, meta=meta))

    async def worker(client: Any, meta: Any) -> None:
        for _ in range(calls):
            t0 = time.perf_counter()
            structured(await client.call_tool("bash_run", {"command": "echo hi"}, meta=meta))
            latencies.append((time.perf_counter() - t0) * 1000)

    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(headers=auth_headers(served), timeout=60.0))
        clients = [await stack.enter_async_context(official_client(served, http=http)) for _ in range(workers)]
        async with anyio.create_task_group() as tg:  # the sessions first, as for Sandbox(url)
            for client, meta in zip(clients, metas, strict=True):
                tg.start_soon(create, client, meta)
        cpu0, t0 = served.cpu_seconds(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for client, meta in zip(clients, metas, strict=True):
                tg.start_soon(worker, client, meta)
        elapsed, cpu = time.perf_counter() - t0, served.cpu_seconds() - cpu0
        async with anyio.create_task_group() as tg:
            for client, meta in zip(clients, metas, strict=True):
                tg.start_soon(destroy, client, meta)
    total = workers * calls
    label = f"official client, {workers}x{calls}"
    row(
        f"{label}: calls/s",
        total / elapsed,
        "calls/s",
        target=Target(547, at_least=True, text=">= 547 (0.5x original)"),
        original="1094 calls/s",
    )
    row(f"{label}: p50 latency", p50(latencies), "ms")
    row(f"{label}: p95 latency", percentile(latencies, 0.95), "ms")
    row(f"{label}: server CPU per call", cpu / total * 1000, "ms", target=Target(0.5), original="~0.74 ms")


# -- memory ------------------------------------------------------------------------------


async def memory(sessions: int) -> None:
    section(f"memory: {sessions} idle bash sessions on one HTTP server")
    with http_server() as served:
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(Sandbox(url=served.url, token=served.token)) for _ in range(sessions)
            ]
            await anyio.sleep(1.0)
            idle = rss_kb(served.pid)
            for client in clients:
                await client.create_session("bash")
            measured = [
                session_memory(s["details"])
                for s in (await clients[0].list_sessions())["sessions"]
                + (await clients[-1].list_sessions())["sessions"]
            ]
            busy = rss_kb(served.pid)
        processes = sum(m[0] for m in measured) / len(measured)
        pss = sum(m[1] for m in measured) / len(measured)
        cgroups = [m[2] for m in measured if m[2] is not None]
        row("processes per session (sandbox membership)", processes, "")
        row("PSS per session (its processes)", pss, "kB")
        if cgroups:
            row(
                "memory cgroup usage per session",
                sum(cgroups) / len(cgroups),
                "kB",
                extra="(kernel-counted, incl. tmpfs)",
            )
        row("server RSS per session", (busy - idle) / sessions, "kB", extra=f"(RSS {idle} kB idle -> {busy} kB)")


async def main(quick: bool) -> None:
    n = 200 if quick else 1000
    await calibration()
    with http_server() as served:
        await per_transport(served, n)
        section("throughput: 50 workers x 20 bash_run 'echo hi', each worker in its own session")
        await throughput_sandbox(served, 50, 20)
        await anyio.sleep(1.0)
        await throughput_official(served, 50, 20)
        await concurrent_creates(served, 50, 3 if quick else 7)
    await memory(20 if quick else 50)
    sys.stdout.write(
        "\nnot measured here: stdio throughput (one stdio server per worker); the original's own client.\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer samples; finishes in about 2 minutes")
    anyio.run(main, parser.parse_args().quick)
