"""Small helpers shared by the benchmark scripts: timing statistics, calibration, a server subprocess, memory."""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2 as httpx
import psutil
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_server.tokens import TOKEN_ENV
from tests.support import leaks, procs
from tests.support.ports import free_port

#: The `_meta` key naming a worker (mcp_server/worker_identity.py).
WORKER_META_KEY = "agentflow/worker_id"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, samples_ms: list[float], unit: str = "ms") -> str:
    """Print and return `name  median X  p95 Y` for the samples (milliseconds unless `unit`)."""
    median = statistics.median(samples_ms)
    p95 = percentile(samples_ms, 0.95)
    line = f"{name:<58} median {median:8.3f} {unit}   p95 {p95:8.3f} {unit}   (n={len(samples_ms)})"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return line


async def measure(fn: Callable[[], Awaitable[object]], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        await fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def loop_ms(iterations: int = 1_000_000) -> float:
    """Milliseconds for a plain Python loop: how fast this machine runs Python right now."""
    t0 = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return (time.perf_counter() - t0) * 1000


def pipe_round_trip_us(rounds: int = 2000) -> float:
    """Median microseconds to write a line to a live `cat` and read it back."""
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0) as cat:
        assert cat.stdin is not None
        assert cat.stdout is not None
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            os.write(cat.stdin.fileno(), b"x\n")
            os.read(cat.stdout.fileno(), 64)
            samples.append((time.perf_counter() - t0) * 1e6)
        cat.kill()
    return statistics.median(samples)


@dataclass(frozen=True)
class Served:
    url: str
    pid: int
    token: str = field(repr=False)

    @property
    def base(self) -> str:
        return self.url.removesuffix("/mcp")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system


@contextmanager
def http_server(manifest: str | None = None) -> Iterator[Served]:
    """`agentflow-sandbox serve --transport http` on a free port; yields its /mcp URL, pid and token.

    No `--manifest`: the packaged default, with its isolation tier and warm pool, is what is measured.
    """
    port = free_port()
    token = secrets.token_urlsafe(24)
    argv = [sys.executable, "-m", "mcp_server", "serve", "--transport", "http", "--port", str(port)]
    argv += ["--log-level", "WARNING"]
    if manifest:
        argv += ["--manifest", manifest]
    env = {**os.environ, TOKEN_ENV: token}
    with running_server(argv, port, within=20, env=env) as proc:
        yield Served(f"http://127.0.0.1:{port}/mcp", proc.pid, token)


@contextmanager
def running_server(
    argv: list[str], port: int, *, within: float, what: str = "server", **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `argv` (an HTTP server on `port`), wait until /health answers, stop it on exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    leaks.note_server(proc.pid)
    try:
        deadline = time.monotonic() + within
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not come up")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def official_client(
    served: Served, mode: Literal["auto", "legacy"] = "auto", http: httpx.AsyncClient | None = None
) -> AsyncIterator[Client]:
    """The official MCP SDK client over streamable HTTP (2026-07-28 unless `mode="legacy"`)."""
    async with AsyncExitStack() as stack:
        if http is None:
            timeout = httpx.Timeout(30.0, read=300.0)
            http = await stack.enter_async_context(httpx.AsyncClient(headers=auth_headers(served), timeout=timeout))
        yield await stack.enter_async_context(Client(streamable_http_client(served.url, http_client=http), mode=mode))


def auth_headers(served: Served) -> dict[str, str]:
    return {"Authorization": f"Bearer {served.token}"}


def worker_meta(key: str | None = None) -> Any:
    """A request `_meta` naming a (fresh, unguessable) worker."""
    return {WORKER_META_KEY: key or secrets.token_urlsafe(16)}


def structured(result: Any) -> dict[str, Any]:
    """The envelope of a `CallToolResult`; raises if the call failed (a benchmark must not time errors)."""
    envelope = dict(result.structured_content or {})
    if envelope.get("code") != 0:
        raise RuntimeError(f"call failed: {envelope or result}")
    return envelope


def session_memory(details: dict[str, Any]) -> tuple[int, int, int | None]:
    """(processes, PSS kB of them, cgroup memory kB or None) of one session, from list_sessions' details.

    The server lists each session's processes by its sandbox membership (cgroup, uid, pid
    namespace) and names its memory cgroup; no environment tag is involved.
    """
    pids = [int(p) for p in details.get("pids", [])]
    directories = ((details.get("cgroup") or {}).get("paths") or {}).values()
    for directory in directories:
        for name in ("memory.current", "memory.usage_in_bytes"):  # cgroup v2, v1
            try:
                with open(os.path.join(directory, name)) as fh:
                    return len(pids), procs.pss_kb(pids), int(fh.read()) // 1024
            except (OSError, ValueError):
                continue
    return len(pids), procs.pss_kb(pids), None


def pss_kb(pid: int) -> int:
    """Proportional set size of one process, in kB (0 if it is gone)."""
    return procs.pss_kb([pid])


def rss_kb(pid: int | None = None) -> int:
    return procs.rss_kb(pid)
