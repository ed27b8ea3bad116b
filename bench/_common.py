"""Small helpers shared by the benchmark scripts: timing statistics, a server subprocess, memory."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx2 as httpx

from tests.support import leaks, procs
from tests.support.ports import free_port


def summarize(name: str, samples_ms: list[float], unit: str = "ms") -> str:
    """Print and return `name  median X  p95 Y` for the samples (milliseconds unless `unit`)."""
    ordered = sorted(samples_ms)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    median = statistics.median(ordered)
    line = f"{name:<58} median {median:8.3f} {unit}   p95 {p95:8.3f} {unit}   (n={len(ordered)})"
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


@dataclass(frozen=True)
class Served:
    url: str
    pid: int


@contextmanager
def http_server(manifest: str | None = None) -> Iterator[Served]:
    """`agentflow-sandbox serve --transport http` on a free port; yields its /mcp URL and pid."""
    port = free_port()
    argv = [sys.executable, "-m", "mcp_server", "serve", "--transport", "http", "--port", str(port)]
    argv += ["--log-level", "WARNING"]
    if manifest:
        argv += ["--manifest", manifest]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leaks.note_server(proc.pid)  # its sessions' processes name it: leaks.session_pids() finds them
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not come up")
            time.sleep(0.05)
        yield Served(f"http://127.0.0.1:{port}/mcp", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pss_kb(pid: int) -> int:
    """Proportional set size of one process, in kB (0 if it is gone)."""
    return procs.pss_kb([pid])


def rss_kb(pid: int | None = None) -> int:
    return procs.rss_kb(pid)
