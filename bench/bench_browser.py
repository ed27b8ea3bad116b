"""Benchmark of the browser backend against a real Chromium and a local HTTP server.

Prints median and p95 (ms) of: warmup (browser launch), session create + destroy
(a context with one tab), navigate to a local page, snapshot, screenshot, click; the
throughput of 20 concurrent sessions each doing navigate + snapshot + click; and the
memory of idle contexts (PSS of the browser's process tree, through psutil).

    python bench/bench_browser.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import ToolContext
from backends.browser import BrowserBackend
from backends.browser.args import ClickArgs, NavigateArgs, ScreenshotArgs, SnapshotArgs
from backends.browser.session import BrowserSession
from tests.support import procs

PAGE = (
    """<!doctype html><title>Bench</title>
<h1>Benchmark page</h1>
<nav><a href="/next">Next page</a> <a href="/">Home</a></nav>
<form action="/next"><label>Name <input name="q"></label><button type="button" id="b"
  onclick="this.textContent = 'Clicked ' + (++window.n || (window.n = 1))">Press me</button></form>
<ul>"""
    + "".join(f"<li><a href='/item/{i}'>Item {i}</a> some text about item {i}</li>" for i in range(30))
    + "</ul>"
)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = (PAGE if self.path == "/" else "<title>Next</title><p>next page</p>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def stats(name: str, samples: list[float], unit: str = "ms") -> None:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(f"{name:<44} median {statistics.median(ordered):8.1f} {unit}   p95 {p95:8.1f} {unit}   (n={len(ordered)})")


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1000


class Tab:
    def __init__(self, backend: BrowserBackend, worker: str, state: BrowserSession) -> None:
        self.b, self.state = backend, state
        self.ctx = ToolContext(worker_id=worker, session_id=worker, state=state)

    async def close(self) -> None:
        info = SimpleNamespace(session_id="s", worker_id="w", resource_type="browser", state=self.state)
        await self.b.cleanup("w", info)


async def open_tab(backend: BrowserBackend, worker: str) -> Tab:
    # Generous action timeout: on a loaded 2-core machine 20 parallel sessions queue for CPU.
    config = backend.session_config({"timeout_ms": 60_000})
    return Tab(backend, worker, await backend.initialize(worker, config))


def ref_of(snapshot: str, needle: str) -> str:
    line = next(line for line in snapshot.splitlines() if needle in line and "[ref=" in line)
    return line.split("[ref=", 1)[1].split("]", 1)[0]


async def bench_latencies(site: str, rounds: int) -> None:
    launches, relaunches = [], []
    for _ in range(max(3, rounds // 6)):
        backend = BrowserBackend("browser", {})
        launches.append(await timed(backend.warmup))
        for _ in range(2):  # a relaunch after a crash: the driver is already running
            handle = await backend.launcher.browser()
            await handle.browser.close()
            relaunches.append(await timed(backend.launcher.browser))
        await backend.shutdown()
    stats("warmup (Playwright driver + Chromium launch)", launches)
    stats("relaunch of Chromium (driver running)", relaunches)

    backend = BrowserBackend("browser", {})
    await backend.warmup()
    try:
        create, destroy = [], []
        for i in range(rounds):
            start = time.perf_counter()
            tab = await open_tab(backend, f"w{i}")
            create.append((time.perf_counter() - start) * 1000)
            destroy.append(await timed(tab.close))
        stats("session create (context + tab)", create)
        stats("session destroy", destroy)
        both = [a + b for a, b in zip(create, destroy, strict=True)]
        stats("session create + destroy", both)

        tab = await open_tab(backend, "bench")
        b, ctx = backend, tab.ctx
        nav, snap, shot, click, nav_click = [], [], [], [], []
        for _ in range(rounds):
            nav.append(await timed(lambda: b.navigate(ctx, NavigateArgs(url=f"{site}/"))))
            snap.append(await timed(lambda: b.snapshot(ctx, SnapshotArgs())))
            shot.append(await timed(lambda: b.screenshot(ctx, ScreenshotArgs())))
            click.append(await timed(lambda: b.click(ctx, ClickArgs(selector="#b"))))
        text = (await b.snapshot(ctx, SnapshotArgs()))["snapshot"]
        ref = ref_of(text, "Press me") if "Press me" in text else ref_of(text, "Clicked")
        click_ref = [await timed(lambda: b.click(ctx, ClickArgs(ref=ref))) for _ in range(rounds)]
        for _ in range(rounds):
            await b.navigate(ctx, NavigateArgs(url=f"{site}/"))
            link = ref_of((await b.snapshot(ctx, SnapshotArgs()))["snapshot"], "Next page")
            nav_click.append(await timed(partial(b.click, ctx, ClickArgs(ref=link))))
        await tab.close()
        stats("navigate to a local page", nav)
        stats(f"snapshot ({len(text)} chars)", snap)
        stats("screenshot 1280x800 PNG", shot)
        stats("click (selector, no navigation)", click)
        stats("click (ref, no navigation)", click_ref)
        stats("click (ref, link -> navigation)", nav_click)
    finally:
        await backend.shutdown()


async def bench_throughput(site: str, sessions: int, rounds: int) -> None:
    backend = BrowserBackend("browser", {})
    await backend.warmup()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            tabs = await asyncio.gather(*(open_tab(backend, f"c{i}") for i in range(sessions)))
            created = (time.perf_counter() - start) * 1000

            async def journey(tab: Tab) -> float:
                t0 = time.perf_counter()
                await backend.navigate(tab.ctx, NavigateArgs(url=f"{site}/"))
                text = (await backend.snapshot(tab.ctx, SnapshotArgs()))["snapshot"]
                await backend.click(tab.ctx, ClickArgs(ref=ref_of(text, "Next page")))
                return (time.perf_counter() - t0) * 1000

            start = time.perf_counter()
            per = await asyncio.gather(*(journey(t) for t in tabs))
            wall = time.perf_counter() - start
            await asyncio.gather(*(t.close() for t in tabs))
            print(
                f"{sessions} concurrent sessions: create all {created:7.0f} ms; navigate+snapshot+click all "
                f"{wall * 1000:7.0f} ms = {sessions / wall:5.1f} journeys/s ({3 * sessions / wall:5.1f} calls/s); "
                f"per journey median {statistics.median(per):.0f} ms, max {max(per):.0f} ms"
            )
    finally:
        await backend.shutdown()


async def bench_memory(site: str, contexts: int) -> None:
    backend = BrowserBackend("browser", {})
    await backend.warmup()
    try:
        await asyncio.sleep(0.5)
        base = procs.pss_kb(backend.launcher.pids())
        tabs = [await open_tab(backend, f"m{i}") for i in range(contexts)]
        await asyncio.sleep(0.5)
        blank = procs.pss_kb(backend.launcher.pids())
        for tab in tabs:
            await backend.navigate(tab.ctx, NavigateArgs(url=f"{site}/"))
        await asyncio.sleep(0.5)
        loaded = procs.pss_kb(backend.launcher.pids())
        chromium = set(backend.launcher.pids())
        driver = [p for p in procs.descendants(os.getpid()) if p not in chromium]
        print(f"browser tree PSS, no context:                {base / 1024:7.1f} MiB")
        print(
            f"browser tree PSS, {contexts} idle contexts (blank tab): {blank / 1024:7.1f} MiB "
            f"= +{(blank - base) / 1024 / contexts:.1f} MiB per context"
        )
        print(
            f"browser tree PSS, {contexts} contexts on a local page:  {loaded / 1024:7.1f} MiB "
            f"= +{(loaded - base) / 1024 / contexts:.1f} MiB per context"
        )
        print(f"Playwright driver (node) PSS:                {procs.pss_kb(driver) / 1024:7.1f} MiB")
        for tab in tabs:
            await tab.close()
    finally:
        await backend.shutdown()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="samples per latency figure")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions in the throughput run")
    parser.add_argument("--contexts", type=int, default=10, help="idle contexts in the memory run")
    options = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{server.server_address[1]}"
    print(f"browser backend benchmark: {os.cpu_count()} CPUs, Chromium /usr/bin/chromium, pages from {site}")
    try:
        await bench_latencies(site, options.rounds)
        await bench_throughput(site, options.sessions, rounds=3)
        await bench_memory(site, options.contexts)
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    asyncio.run(main())
