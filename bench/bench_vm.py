"""Benchmark of the vm backend: prints median and p95, asserts nothing.

    python bench/bench_vm.py [--rounds N]

Measures, through the backend's tool methods (what a tool call costs minus the
engine and MCP): session create + destroy; screenshot at 1280x800 and 1920x1080
(grab + PNG + pointer query); click; typing 20 characters; memory (PSS) per idle
session. Needs Xvfb, openbox and xterm.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import ToolContext
from backends.vm import VMBackend, VMState
from backends.vm.models import ClickArgs, TypeArgs
from bench._common import measure, summarize
from tests.support import procs

log = logging.getLogger("bench_vm")


def report(name: str, samples: list[float], unit: str = "ms") -> None:
    summarize(name, samples, unit)


async def timed(fn: Callable[[], Awaitable[Any]], rounds: int, warmup: int = 2) -> list[float]:
    return await measure(fn, rounds, warmup)


def pss_kib(pids: list[int]) -> int:
    return procs.pss_kb(pids)


class Bench:
    def __init__(self) -> None:
        self.backend = VMBackend("vm", {})

    async def start(self, config: dict[str, Any]) -> tuple[VMState, ToolContext[VMState]]:
        cfg = self.backend.session_config(config)
        state = await self.backend.initialize("bench", cfg)
        return state, ToolContext(worker_id="bench", session_id="b", state=state, config=cfg)

    async def stop(self, state: VMState) -> None:
        await self.backend.cleanup("bench", SimpleNamespace(state=state))

    async def lifecycle(self, rounds: int) -> None:
        async def once() -> None:
            state, _ = await self.start({})
            await self.stop(state)

        report("session create + destroy", await timed(once, rounds))

    async def screenshots(self, rounds: int) -> None:
        for size in ((1280, 800), (1920, 1080)):
            state, ctx = await self.start({"screen_size": list(size), "startup": [["xterm"]]})
            try:
                sizes: list[int] = []

                async def shot(ctx: ToolContext[VMState] = ctx, sizes: list[int] = sizes) -> None:
                    result = await self.backend.screenshot(ctx)
                    sizes.append(len(result.images[0].data))

                report(f"screenshot {size[0]}x{size[1]}", await timed(shot, rounds))
                sys.stdout.write(f"{'':<34} PNG {statistics.median(sizes) / 1024:.1f} KiB (xterm on screen)\n")
            finally:
                await self.stop(state)

    async def input(self, rounds: int) -> None:
        state, ctx = await self.start({"startup": [["xterm", "-e", "cat"]]})
        try:
            click = ClickArgs(x=5, y=5)
            report("click", await timed(lambda: self.backend.click(ctx, click), rounds * 5))
            text = TypeArgs(text="abcdefghij ABCDE 123")
            report("type 20 characters", await timed(lambda: self.backend.type_(ctx, text), rounds))
            accented = TypeArgs(text="héllo wörld → ✓ αβγδ")
            report("type 20 characters (Unicode)", await timed(lambda: self.backend.type_(ctx, accented), rounds))
        finally:
            await self.stop(state)

    async def memory(self, sessions: int) -> None:
        for label, config in (("idle session (Xvfb+openbox)", {}), ("session with xterm", {"startup": ["xterm"]})):
            states = [(await self.start(config))[0] for _ in range(sessions)]
            try:
                await anyio.sleep(0.5)
                samples = [pss_kib(s.desktop.pids()) / 1024 for s in states]
                report(f"PSS {label}", samples, "MiB")
            finally:
                for state in states:
                    await self.stop(state)


async def main(rounds: int) -> None:
    bench = Bench()
    await bench.lifecycle(rounds)
    await bench.screenshots(rounds)
    await bench.input(rounds)
    await bench.memory(max(3, rounds // 5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    anyio.run(main, args.rounds)
