"""Random lifecycles against real bash sessions: no internal error, no leaked process or temp dir.

Eight workers each run a seeded random mix of create, call (explicit and temporary),
reinitialize, refresh, list, destroy and disconnect, under a TTL short enough that the
reaper races them. Whatever interleaving happens, every answer is a success or one of
the expected session errors, and when the engine is gone nothing it started remains.
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from backends.base import Runtime
from backends.bash import BashBackend
from backends.policy import Policy
from session.engine import Engine
from session.errors import SandboxError
from tests.support.leaks import new_test_marker, session_pids
from tests.support.manifests import TEST_MARKER_ENV

pytestmark = pytest.mark.slow

ALLOWED_CALL_CODES = {0, 1003, 2002}
RUN_ENV = TEST_MARKER_ENV  # this test's shells carry its marker: other runs may share the machine


async def churn(engine: Engine, worker: str, rng: random.Random, codes: list[int], run_id: str) -> None:
    for _ in range(25):
        op = rng.choice(["create", "call", "call", "temp", "reinit", "refresh", "list", "destroy", "close"])
        try:
            if op == "create":
                env = {RUN_ENV: run_id, "N": str(rng.randint(0, 9))}
                await engine.create_sessions(worker, "bash", {"env": env})
            elif op in ("call", "temp"):
                command = rng.choice(["echo $N", "sleep 0.05; echo done", "sleep 5 &", "cd /tmp && pwd"])
                worker_for_call = f"{worker}-temp" if op == "temp" else worker  # never has a session
                outcome = await engine.call_tool(worker_for_call, "bash:run", {"command": command, "timeout": 2})
                codes.append(outcome.envelope.code)
            elif op == "reinit":
                await engine.reinitialize(worker, "bash", {"env": {RUN_ENV: run_id, "N": "r"}})
            elif op == "refresh":
                engine.refresh_sessions(worker)
            elif op == "list":
                engine.list_sessions(worker, details=True)
            elif op == "destroy":
                await engine.destroy_sessions(worker)
            else:
                await engine.close_worker(worker)
        except SandboxError as exc:
            codes.append(exc.code)
        await anyio.sleep(rng.random() * 0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_random_lifecycles_leave_no_process_or_directory(seed: int, tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "agentflow-churn", Runtime.for_process().server_id)  # scratch dirs land here
    run_id = new_test_marker()
    codes: list[int] = []
    bash = BashBackend("bash", defaults={"env": {RUN_ENV: run_id}}, policy=Policy(isolation="none"), runtime=runtime)
    engine = Engine({"bash": bash}, session_ttl=0.4, runtime=runtime)
    async with engine, anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(churn, engine, f"w{n}", random.Random(seed * 100 + n), codes, run_id)
    assert codes.count(0) > 20, "the churn made too few successful calls to mean anything"
    assert set(codes) <= ALLOWED_CALL_CODES, sorted(set(codes))
    assert session_pids(test_marker=run_id) == []
    assert [entry async for entry in anyio.Path(tmp_path).iterdir()] == []
