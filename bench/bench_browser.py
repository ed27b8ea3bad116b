"""Benchmark of the browser backend against a real Chromium and a local HTTP server.

Prints median and p95 (ms) of: warmup (browser launch), session create + destroy
(a context with one tab), navigate to a local page, snapshot, screenshot, click; the
throughput of 20 concurrent sessions each doing navigate + snapshot + click; and the
memory of idle contexts (PSS of the browser's process tree, through psutil).

Each figure is measured for every isolation tier asked for (default: `sandbox`, the
confined Chromium, then `none`, the unconfined one) in the same run; pages go through
the egress proxy in both (the local site is allowed by the session's policy).

    python bench/bench_browser.py [--rounds N] [--tiers sandbox,none]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import Runtime, SessionSetup, ToolContext
from backends.browser import BrowserBackend
from backends.browser.models import ClickArgs, NavigateArgs, ScreenshotArgs, SnapshotArgs
from backends.browser.session import BrowserSession
from backends.policy import Policy
from session.errors import ConfigurationError
from tests.support import procs

TIER = "sandbox"
SCRATCH = Path(tempfile.gettempdir())

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


def new_backend() -> BrowserBackend:
    root = SCRATCH / f"bench-{uuid.uuid4().hex[:6]}"
    root.mkdir(mode=0o711)
    runtime = Runtime(scratch_root=root, server_id=f"bench-{os.getpid()}")
    return BrowserBackend("browser", policy=Policy(isolation=TIER, network="internet"), runtime=runtime)


async def close_backend(backend: BrowserBackend) -> None:
    await backend.shutdown()
    shutil.rmtree(backend.runtime.scratch_root, ignore_errors=True)


class Tab:
    def __init__(self, backend: BrowserBackend, setup: SessionSetup[Any], state: BrowserSession) -> None:
        self.b, self.setup, self.state = backend, setup, state
        self.ctx = ToolContext(config=setup.config, state=state, session=setup)

    async def close(self) -> None:
        await self.b.cleanup(self.setup, self.state)
        shutil.rmtree(self.setup.scratch, ignore_errors=True)


async def open_tab(backend: BrowserBackend, label: str) -> Tab:
    # Generous action timeout: on a loaded 2-core machine 20 parallel sessions queue for CPU.
    config = backend.session_config({"timeout": 60})
    scratch = backend.runtime.scratch_root / f"{label}-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(mode=0o700)
    policy = Policy(isolation=TIER, network="internet", allow_private_hosts=["127.0.0.1"])
    setup = SessionSetup(
        worker_id=label,
        session_id=f"sid-{label}",
        label=label,
        resource="browser",
        config=config,
        policy=policy,
        scratch=scratch,
    )
    return Tab(backend, setup, await backend.initialize(setup))


def ref_of(snapshot: str, needle: str) -> str:
    line = next(line for line in snapshot.splitlines() if needle in line and "[ref=" in line)
    return line.split("[ref=", 1)[1].split("]", 1)[0]


async def bench_latencies(site: str, rounds: int) -> None:
    launches, relaunches = [], []
    for _ in range(max(3, rounds // 6)):
        backend = new_backend()
        launches.append(await timed(backend.warmup))
        for _ in range(2):  # a relaunch after a crash: the driver is already running
            handle = await backend.launcher.browser()
            await handle.browser.close()
            relaunches.append(await timed(backend.launcher.browser))
        await close_backend(backend)
    stats("warmup (Playwright driver + Chromium launch)", launches)
    stats("relaunch of Chromium (driver running)", relaunches)

    backend = new_backend()
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
        text = (await b.snapshot(ctx, SnapshotArgs())).snapshot
        ref = ref_of(text, "Press me") if "Press me" in text else ref_of(text, "Clicked")
        click_ref = [await timed(lambda: b.click(ctx, ClickArgs(ref=ref))) for _ in range(rounds)]
        for _ in range(rounds):
            await b.navigate(ctx, NavigateArgs(url=f"{site}/"))
            link = ref_of((await b.snapshot(ctx, SnapshotArgs())).snapshot, "Next page")
            nav_click.append(await timed(functools.partial(b.click, ctx, ClickArgs(ref=link))))
        await tab.close()
        stats("navigate to a local page", nav)
        stats(f"snapshot ({len(text)} chars)", snap)
        stats("screenshot 1280x800 PNG", shot)
        stats("click (selector, no navigation)", click)
        stats("click (ref, no navigation)", click_ref)
        stats("click (ref, link -> navigation)", nav_click)
    finally:
        await close_backend(backend)


async def bench_throughput(site: str, sessions: int, rounds: int) -> None:
    backend = new_backend()
    await backend.warmup()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            tabs = await asyncio.gather(*(open_tab(backend, f"c{i}") for i in range(sessions)))
            created = (time.perf_counter() - start) * 1000

            async def journey(tab: Tab) -> float:
                t0 = time.perf_counter()
                await backend.navigate(tab.ctx, NavigateArgs(url=f"{site}/"))
                text = (await backend.snapshot(tab.ctx, SnapshotArgs())).snapshot
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
        await close_backend(backend)


async def bench_memory(site: str, contexts: int) -> None:
    backend = new_backend()
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
        await close_backend(backend)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="samples per latency figure")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions in the throughput run")
    parser.add_argument("--contexts", type=int, default=10, help="idle contexts in the memory run")
    parser.add_argument(
        "--tiers",
        default="sandbox,none",
        help="isolation tiers to measure, in order ('none' is refused on a root server: Chromium never runs "
        "as root without its own sandbox)",
    )
    options = parser.parse_args()
    global TIER
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{server.server_address[1]}"
    print(f"browser backend benchmark: {os.cpu_count()} CPUs, Chromium /usr/bin/chromium, pages from {site}")
    try:
        for tier in options.tiers.split(","):
            TIER = tier.strip()
            print(f"\n== isolation {TIER!r} ==")
            try:
                await bench_latencies(site, options.rounds)
            except ConfigurationError as refused:
                print(f"not measured: {refused.message}")
                continue
            await bench_throughput(site, options.sessions, rounds=3)
            await bench_memory(site, options.contexts)
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    asyncio.run(main())
