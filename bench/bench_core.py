"""Core figures: MCP overhead per transport, bash calls, temporary sessions, throughput, memory.

Run: python bench/bench_core.py [--quick]   (prints; asserts nothing)
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import http_server, measure, pss_kb, rss_kb, summarize
from sandbox import Sandbox
from tests.support.leaks import session_pids


async def per_transport(n: int) -> None:
    sys.stdout.write("\n== one call on an explicit bash session, by transport ==\n")
    with http_server() as served:
        url = served.url
        targets = {
            "in-memory": Sandbox(),
            "stdio": Sandbox(command=[sys.executable, "-m", "mcp_server", "serve", "--log-level", "WARNING"]),
            "streamable HTTP (2026-07-28, worker key)": Sandbox(url=url),
            "streamable HTTP (handshake, Mcp-Session-Id)": Sandbox(url=url, mode="legacy"),
        }
        for label, sandbox in targets.items():
            async with sandbox:
                await sandbox.create_session("bash")
                calls = await measure(partial(sandbox.execute, "bash:run", {"command": ":"}), n)
                listing = await measure(sandbox.list_sessions, n)
            summarize(f"{label}: bash_run ':'", calls)
            summarize(f"{label}: list_sessions (no backend I/O)", listing)


async def bash_paths(n: int) -> None:
    sys.stdout.write("\n== bash (in-memory transport) ==\n")
    async with Sandbox() as sandbox:
        await sandbox.create_session("bash")
        summarize(
            'bash_run "echo hi", explicit session',
            await measure(lambda: sandbox.execute("bash:run", {"command": "echo hi"}), n),
        )
        await sandbox.destroy_session("bash")
        summarize(
            'bash_run "echo hi", temporary session (create+run+destroy)',
            await measure(lambda: sandbox.execute("bash:run", {"command": "echo hi"}), max(n // 4, 50)),
        )

        async def create_destroy() -> None:
            await sandbox.create_session("bash")
            await sandbox.destroy_session("bash")

        summarize("create_session + destroy_session (bash)", await measure(create_destroy, max(n // 4, 50)))


async def throughput(url: str, workers: int, calls: int, label: str) -> None:
    latencies: list[float] = []

    async def worker(sandbox: Sandbox) -> None:
        await sandbox.create_session("bash")
        for _ in range(calls):
            t0 = time.perf_counter()
            result = await sandbox.execute("bash:run", {"command": "echo hi"})
            latencies.append((time.perf_counter() - t0) * 1000)
            assert result["code"] == 0, result

    sandboxes = [Sandbox(url=url) for _ in range(workers)]
    for sandbox in sandboxes:
        await sandbox.start()
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for sandbox in sandboxes:
            tg.start_soon(worker, sandbox)
    elapsed = time.perf_counter() - t0
    for sandbox in reversed(sandboxes):  # clients nest: close them in reverse order
        await sandbox.close()
    total = workers * calls
    sys.stdout.write(f"{label:<58} {total / elapsed:8.0f} calls/s   ({total} calls in {elapsed:.2f} s)\n")
    summarize(f"{label}: per-call latency", latencies)


async def memory(sessions: int) -> None:
    sys.stdout.write("\n== memory: idle bash sessions on one HTTP server ==\n")
    with http_server() as served:
        clients = [Sandbox(url=served.url) for _ in range(sessions)]
        for client in clients:
            await client.start()
        idle = rss_kb(served.pid)
        for client in clients:
            await client.create_session("bash")
        pids = session_pids(tag_prefix="bash-")
        shells = sum(pss_kb(p) for p in pids)
        busy = rss_kb(served.pid)
        sys.stdout.write(
            f"{sessions} idle bash sessions: {shells / max(len(pids), 1):.0f} kB PSS per shell; "
            f"server RSS {idle} kB -> {busy} kB (+{(busy - idle) / sessions:.0f} kB per session)\n"
        )
        for client in reversed(clients):
            await client.close()


async def main(quick: bool) -> None:
    n = 200 if quick else 1000
    await per_transport(n)
    await bash_paths(n)
    sys.stdout.write("\n== throughput: 50 workers x 20 bash_run, each in its own session ==\n")
    with http_server() as served:
        await throughput(served.url, 50, 20, "streamable HTTP, 50 workers x 20")
    await memory(50)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    anyio.run(main, parser.parse_args().quick)
