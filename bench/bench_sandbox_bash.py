"""Cost of the bash backend's sandbox tiers, through the engine (what a tool call pays, minus MCP).

For each tier (none / sandbox / gvisor) in the same run:
  create+destroy     create_session + destroy_session of a bash session
  first command      bash_run in a session created just before (the shell already answered once)
  per-command        bash_run "true" in a warm session (engine + shell round trip)
  shell round trip   the persistent shell alone (PersistentShell.run), no engine
  temporary call     bash_run without a session: create + run + destroy in one call
and the added cost of each tier over `none` (medians). Tiers this host cannot run are skipped
with the reason.

Run as root: python bench/bench_sandbox_bash.py [--quick]   (prints; asserts nothing)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.bash import BashBackend
from backends.policy import Policy
from backends.sandbox import mechanisms
from bench._common import measure, summarize
from session.engine import Engine
from session.models import Caller

TIERS = ("none", "sandbox", "gvisor")
CALLER = Caller(worker="bench")


async def call(engine: Engine, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    envelope = (await engine.call(CALLER, tool, arguments)).envelope
    if envelope.code != 0:
        raise RuntimeError(f"{tool}: {envelope.message}")
    return envelope.data


async def bench_tier(tier: str, n: int) -> dict[str, float]:
    medians: dict[str, float] = {}
    backend = BashBackend("bash", policy=Policy(isolation=tier))
    async with Engine({"bash": backend}, session_ttl=600) as engine:

        async def create_destroy() -> None:
            sid = (await call(engine, "create_session", {"resource": "bash"}))["session_id"]
            await call(engine, "destroy_session", {"session_id": sid})

        samples = await measure(create_destroy, max(5, n // 20), warmup=2)
        summarize(f"[{tier}] create_session + destroy_session", samples)
        medians["create+destroy"] = statistics.median(samples)

        first: list[float] = []
        for _ in range(max(5, n // 20)):
            sid = (await call(engine, "create_session", {"resource": "bash"}))["session_id"]
            t0 = anyio.current_time()
            await call(engine, "bash_run", {"command": "echo first", "session_id": sid})
            first.append((anyio.current_time() - t0) * 1000)
            await call(engine, "destroy_session", {"session_id": sid})
        summarize(f"[{tier}] first bash_run in a new session", first)
        medians["first command"] = statistics.median(first)

        sid = (await call(engine, "create_session", {"resource": "bash"}))["session_id"]

        async def one_command() -> None:
            await call(engine, "bash_run", {"command": "true", "session_id": sid})

        samples = await measure(one_command, n)
        summarize(f'[{tier}] bash_run "true" in a warm session (engine)', samples)
        medians["per-command"] = statistics.median(samples)

        state = engine.sessions[sid].state

        async def shell_only() -> None:
            await state.shell.run("true", 30)

        samples = await measure(shell_only, n)
        summarize(f"[{tier}] shell round trip alone (no engine)", samples)
        medians["shell round trip"] = statistics.median(samples)
        await call(engine, "destroy_session", {"session_id": sid})

        async def temporary() -> None:
            await call(engine, "bash_run", {"command": "true"})

        samples = await measure(temporary, max(5, n // 20), warmup=2)
        summarize(f"[{tier}] bash_run in a temporary session (create+run+destroy)", samples)
        medians["temporary call"] = statistics.median(samples)
    return medians


async def main(quick: bool) -> None:
    n = 60 if quick else 400
    tiers = mechanisms()["tiers"]
    results: dict[str, dict[str, float]] = {}
    for tier in TIERS:
        if tiers[tier] != "available":
            sys.stdout.write(f"[{tier}] skipped: {tiers[tier]}\n")
            continue
        results[tier] = await bench_tier(tier, n)
    base = results.get("none")
    if base is None:
        return
    sys.stdout.write("\nadded cost over tier 'none' (medians, ms):\n")
    for tier, figures in results.items():
        if tier == "none":
            continue
        added = ", ".join(f"{k} {figures[k] - base[k]:+.3f}" for k in figures)
        sys.stdout.write(f"  {tier:<8} {added}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    anyio.run(main, parser.parse_args().quick)
