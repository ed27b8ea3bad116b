"""Cost of session sandboxes per tier: create+destroy, first command, per-command round trip.

Each tier (none / sandbox / gvisor) runs a persistent `bash` over pipes; a command is
`echo <sentinel>` and the round trip ends when the sentinel line is read back. "bare" is a
plain bash subprocess with no sandbox package at all, for reference.

Run as root: python bench/bench_sandbox.py [--quick]   (prints; asserts nothing)
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from anyio.abc import Process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.policy import Policy
from backends.sandbox import SandboxSpec, SessionSandbox, mechanisms
from bench._common import measure, summarize

SERVER_ID = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
BASH = ["/bin/bash", "--noprofile", "--norc"]


class Shell:
    """A bash over pipes that answers `echo` sentinels."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.buffer = b""

    async def roundtrip(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        await self.process.stdin.send(b"echo __S__\n")
        while b"__S__\n" not in self.buffer:
            self.buffer += await self.process.stdout.receive()
        self.buffer = self.buffer.split(b"__S__\n", 1)[1]


class Boxes:
    def __init__(self, tier: str, root: Path) -> None:
        self.tier = tier
        self.root = root
        self.count = 0

    async def create(self) -> SessionSandbox:
        self.count += 1
        home = self.root / f"s{self.count}" / "home"
        home.mkdir(parents=True)
        spec = SandboxSpec(label=f"s{self.count}", policy=Policy(isolation=self.tier), server_id=SERVER_ID, home=home)
        return await SessionSandbox.create(spec)

    async def shell(self, box: SessionSandbox) -> Shell:
        process = await box.spawn(
            BASH, env={**ENV, "HOME": box.home_path}, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        return Shell(process)


async def bench_tier(tier: str, root: Path, n_start: int, n_cmd: int) -> None:
    boxes = Boxes(tier, root)

    async def create_destroy() -> None:
        box = await boxes.create()
        await box.aclose()

    async def first_command() -> None:
        box = await boxes.create()
        shell = await boxes.shell(box)
        await shell.roundtrip()
        await box.aclose()

    async def phases() -> None:
        t0 = time.perf_counter()
        box = await boxes.create()
        t1 = time.perf_counter()
        shell = await boxes.shell(box)
        await shell.roundtrip()
        t2 = time.perf_counter()
        await box.aclose()
        t3 = time.perf_counter()
        split["create"].append((t1 - t0) * 1000)
        split["spawn bash + first echo"].append((t2 - t1) * 1000)
        split["destroy (kill all, rmdir cgroups, unmount)"].append((t3 - t2) * 1000)

    split: dict[str, list[float]] = {
        "create": [],
        "spawn bash + first echo": [],
        "destroy (kill all, rmdir cgroups, unmount)": [],
    }
    summarize(f"{tier}: create + destroy (uid, cgroups, tmpfs home)", await measure(create_destroy, n_start, 2))
    summarize(f"{tier}: create + bash + first echo + destroy", await measure(first_command, n_start, 2))
    await measure(phases, n_start, 0)
    for phase, samples in split.items():
        summarize(f"{tier}:   of which {phase}", samples)
    box = await boxes.create()
    try:
        shell = await boxes.shell(box)
        summarize(f"{tier}: per-command round trip (echo over pipes)", await measure(shell.roundtrip, n_cmd, 20))
    finally:
        await box.aclose()


async def bench_bare(n_start: int, n_cmd: int) -> None:
    async def start() -> Shell:
        return Shell(await anyio.open_process(BASH, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    async def first_command() -> None:
        shell = await start()
        await shell.roundtrip()
        shell.process.kill()
        await shell.process.wait()

    summarize("bare: bash + first echo (no sandbox package)", await measure(first_command, n_start, 2))
    shell = await start()
    summarize("bare: per-command round trip (echo over pipes)", await measure(shell.roundtrip, n_cmd, 20))
    shell.process.kill()
    await shell.process.wait()


async def main(quick: bool) -> None:
    n_start, n_cmd = (5, 100) if quick else (20, 1000)
    tiers = mechanisms()["tiers"]
    sys.stdout.write(f"== session sandboxes (cgroups: {mechanisms()['limits_mechanism']}) ==\n")
    with tempfile.TemporaryDirectory(prefix=f"agentflow-{SERVER_ID}-") as tmp:
        await bench_bare(n_start, n_cmd)
        for tier in ("none", "sandbox", "gvisor"):
            if tiers[tier] != "available":
                sys.stdout.write(f"{tier}: skipped ({tiers[tier]})\n")
                continue
            t0 = time.perf_counter()
            await bench_tier(tier, Path(tmp) / tier, n_start // 4 if tier == "gvisor" else n_start, n_cmd)
            sys.stdout.write(f"   ({tier} took {time.perf_counter() - t0:.1f} s)\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    anyio.run(main, parser.parse_args().quick)
