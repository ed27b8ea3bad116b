"""Benchmark of the vm backend per isolation tier: prints median and p95, asserts nothing.

    python bench/bench_vm.py [--rounds N] [--tiers none,sandbox]

Measures, through the backend's tool methods (what a tool call costs minus the engine
and MCP), for each tier in the same run: session create + destroy; screenshot at
1280x800 and 1920x1080 (grab + PNG + pointer query); click; typing 20 characters;
memory (PSS) per idle session. Needs Xvfb, openbox and xterm; the `sandbox` tier needs
bubblewrap (it is skipped, with the reason, where the machine cannot provide it).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import Runtime, SessionSetup, ToolContext
from backends.policy import Policy
from backends.sandbox import mechanisms
from backends.vm import VMBackend, VMState
from backends.vm.models import ClickArgs, Config, TypeArgs
from bench._common import measure, summarize

log = logging.getLogger("bench_vm")

Ctx = ToolContext[Config, VMState]


def pss_mib(pids: list[int]) -> float:
    # /proc read directly: psutil is not a dependency of this project (yet).
    total_kib = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kib += sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return total_kib / 1024


class Bench:
    def __init__(self, tier: str, root: Path) -> None:
        self.tier = tier
        self.root = root
        server_id = f"benchvm-{os.getpid()}-{secrets.token_hex(3)}"
        self.backend = VMBackend("vm", runtime=Runtime(scratch_root=root, server_id=server_id))
        self.count = 0

    async def start(self, config: dict[str, Any]) -> tuple[SessionSetup[Config], Ctx]:
        self.count += 1
        label = f"{self.tier}{self.count}"
        scratch = self.root / label
        scratch.mkdir(mode=0o711)
        cfg = self.backend.session_config(config)
        assert isinstance(cfg, Config)
        setup = SessionSetup(
            worker_id="bench",
            session_id=secrets.token_hex(8),
            label=label,
            resource="vm",
            config=cfg,
            policy=Policy(isolation=self.tier),
            scratch=scratch,
        )
        state = await self.backend.initialize(setup)
        return setup, ToolContext(config=cfg, state=state, session=setup)

    async def stop(self, setup: SessionSetup[Config], ctx: Ctx) -> None:
        await self.backend.cleanup(setup, ctx.state)
        shutil.rmtree(setup.scratch, ignore_errors=True)

    def report(self, name: str, samples: list[float], unit: str = "ms") -> None:
        summarize(f"[{self.tier}] {name}", samples, unit)

    async def lifecycle(self, rounds: int) -> None:
        async def once() -> None:
            setup, ctx = await self.start({})
            await self.stop(setup, ctx)

        self.report("session create + destroy", await measure(once, rounds, 2))

    async def screenshots(self, rounds: int) -> None:
        for size in ((1280, 800), (1920, 1080)):
            setup, ctx = await self.start({"screen_size": list(size), "startup": [["xterm"]]})
            try:
                sizes: list[int] = []

                async def shot(ctx: Ctx = ctx, sizes: list[int] = sizes) -> None:
                    result = await self.backend.screenshot(ctx)
                    sizes.append(len(result.images[0].data))

                self.report(f"screenshot {size[0]}x{size[1]}", await measure(shot, rounds, 2))
                sys.stdout.write(f"{'':<44} PNG {statistics.median(sizes) / 1024:.1f} KiB (xterm on screen)\n")
            finally:
                await self.stop(setup, ctx)

    async def input(self, rounds: int) -> None:
        setup, ctx = await self.start({"startup": [["xterm", "-e", "cat"]]})
        try:
            click = ClickArgs(x=5, y=5)
            self.report("click", await measure(lambda: self.backend.click(ctx, click), rounds * 5, 2))
            text = TypeArgs(text="abcdefghij ABCDE 123")
            self.report("type 20 characters", await measure(lambda: self.backend.type_(ctx, text), rounds, 2))
        finally:
            await self.stop(setup, ctx)

    async def memory(self, sessions: int) -> None:
        started = [await self.start({}) for _ in range(sessions)]
        try:
            self.report("PSS idle session (Xvfb+openbox)", [pss_mib(c.state.desktop.pids()) for _, c in started], "MiB")
        finally:
            for setup, ctx in started:
                await self.stop(setup, ctx)


async def main(rounds: int, tiers: list[str]) -> None:
    available = mechanisms()["tiers"]
    for tier in tiers:
        if available.get(tier) != "available":
            sys.stdout.write(f"[{tier}] skipped: isolation {tier!r} {available.get(tier)}\n")
            continue
        root = Path(tempfile.mkdtemp(prefix="agentflow-benchvm-"))
        os.chmod(root, 0o711)  # sandboxes bind from the session directories under it
        try:
            bench = Bench(tier, root)
            await bench.lifecycle(rounds)
            await bench.screenshots(rounds)
            await bench.input(rounds)
            await bench.memory(max(3, rounds // 5))
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tiers", default="none,sandbox", help="comma-separated isolation tiers to compare")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    anyio.run(main, args.rounds, args.tiers.split(","))
