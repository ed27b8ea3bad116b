"""Fast session starts and stops: kill-first teardown, the warm pool's hand-outs, shutdown.

A destroy (or the end of a temporary call) kills every process of the session before it
answers; reaping, cgroup removal and unmounting finish in the background, so the leak checks
here poll (bounded) for what the background removes, and check at once what shutdown must
have finished. Pool hand-outs are checked with a slow-starting fake backend (so callers
really overlap starts in flight) and with real sandboxed shells.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from backends.base import SessionSetup
from backends.bash import BashBackend
from backends.bash.backend import POOL_NICE
from backends.policy import Limits, Policy
from session.engine import Engine
from session.models import LOCAL_PRINCIPAL, Caller
from session.warm_pool import PoolSize
from tests.fakes import FakeBackend, FakeConfig, FakeState
from tests.security.bash_sandbox import (
    Client,
    mounts_under,
    pid_alive,
    require_tier,
    run_cgroup_dirs,
    run_pids,
)
from tests.support.polling import eventually
from tests.support.procs import held_mount_namespaces, pids_of_uid

SANDBOX = Policy(isolation="sandbox", network="none", limits=Limits(pids=128, memory_mb=256, disk_mb=64, cpu=1.0))
#: How long the background part of a stop may take on a loaded machine before a test fails.
BOUNDED = 10.0


@asynccontextmanager
async def sandboxed_bash(pool: int | PoolSize = 0, backend: BashBackend | None = None) -> AsyncIterator[Engine]:
    require_tier("sandbox")
    backend = backend or BashBackend("bash", policy=SANDBOX)
    async with Engine({"bash": backend}, pools={"bash": pool} if pool else None) as engine:
        yield engine


def nice_of(pid: int) -> int:
    """The niceness field of /proc/PID/stat (its 19th field)."""
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[16])


def nice_in_stat(stat_line: str) -> int:
    """The niceness in a /proc/self/stat line a command inside the sandbox printed."""
    return int(stat_line.rsplit(")", 1)[1].split()[16])


#: A command that prints its own /proc/self/stat (a process the shell starts for the caller).
OWN_STAT = "cat /proc/self/stat"


def gone(label: str, uid: int, home: Path) -> bool:
    return not run_pids(label) and not run_cgroup_dirs(label) and not pids_of_uid(uid) and not mounts_under(home)


async def test_a_temporary_sessions_processes_die_before_its_result_and_the_rest_follows() -> None:
    namespaces = held_mount_namespaces()
    async with sandboxed_bash() as engine:
        client = Client(engine, "temp")
        envelope = await client.bash("sleep 1000 & echo $AGENTFLOW_SESSION $(id -u) $$ $!")
        assert envelope.ok, envelope.message
        assert envelope.meta.temporary_session
        label, uid, _, _ = envelope.data["stdout"].split()
        # The session's processes were SIGKILLed before the result came back; reaping,
        # cgroups, mounts and the uid follow within a bounded moment.
        await eventually(lambda: not run_pids(label), BOUNDED, what=lambda: f"processes of {label}: {run_pids(label)}")
        await eventually(lambda: not run_cgroup_dirs(label) and not pids_of_uid(int(uid)), BOUNDED)
        await eventually(lambda: engine.budget.cleanups == 0, BOUNDED)
        assert not list(engine.runtime.scratch_root.glob(f"{label}*"))
        assert held_mount_namespaces() <= namespaces, "the session's mount namespace is still held"


async def test_destroy_answers_after_the_kill_and_leaves_nothing_behind() -> None:
    namespaces = held_mount_namespaces()
    async with sandboxed_bash() as engine:
        client = Client(engine, "owner")
        sid = await client.create()
        details = client.details(sid)
        label, uid, home = engine.sessions[sid].label, details["uid"], Path(details["host_home"])
        await client.out("setsid sleep 1000 </dev/null >/dev/null 2>&1 & disown; echo ok", sid)
        members = run_pids(label)
        assert members
        destroyed = await client.call("destroy_session", {"session_id": sid})
        assert destroyed.ok, destroyed.message
        await eventually(lambda: not [pid for pid in members if pid_alive(pid)], BOUNDED)
        await eventually(lambda: gone(label, uid, home), BOUNDED, what=f"what remains of {label}")
        await eventually(lambda: held_mount_namespaces() <= namespaces, BOUNDED, what="the session's mount namespace")


async def test_shutdown_kills_pool_members_and_finishes_background_cleanups() -> None:
    namespaces = held_mount_namespaces()
    async with sandboxed_bash(pool=2) as engine:
        pool = engine.warm["bash"]
        await eventually(lambda: len(pool.ready) == 2, BOUNDED)
        member_pids = {session.label: run_pids(session.label) for session in pool.ready}
        assert all(member_pids.values())  # the pooled shells run
        client = Client(engine, "owner")
        sid = await client.create()
        destroyed = engine.sessions[sid].label
        assert (await client.call("destroy_session", {"session_id": sid})).ok
        # Leave at once: the destroyed session's cleanup runs, a refill is starting.
        labels = [destroyed, *member_pids, *(session.label for session in pool.starting)]
        scratch = engine.runtime.scratch_root
    # Leaving the engine waited for everything: nothing of the pool or of the destroyed
    # session may remain, checked without polling.
    for label in labels:
        assert run_pids(label) == []
        assert run_cgroup_dirs(label) == []
    assert not [pid for pids in member_pids.values() for pid in pids if pid_alive(pid)]
    assert mounts_under(scratch) == []
    assert held_mount_namespaces() <= namespaces, "a session's or pool member's mount namespace is still held"
    assert engine.budget.cleanups == 0
    assert engine.budget.live == 0


async def test_pooled_shells_serve_default_creates_and_a_different_config_starts_fresh() -> None:
    async with sandboxed_bash(pool=2) as engine:
        pool = engine.warm["bash"]
        await eventually(lambda: len(pool.ready) == 2, BOUNDED)
        ready = {session.label for session in pool.ready}
        alice, bob = Client(engine, "alice"), Client(engine, "bob")
        a = await alice.create()
        assert engine.sessions[a].label in ready
        b = await bob.create({"env": {"MINE": "yes"}})
        assert engine.sessions[b].label not in ready  # not the default config: a fresh session
        assert (await bob.out("echo $MINE", b)).strip() == "yes"
        assert (await alice.out("echo ${MINE:-unset}", a)).strip() == "unset"
        assert engine.status()["warm_pools"]["bash"]["taken"] == 1


class SlowStarts(FakeBackend):
    """Starts take a while (so callers overlap starts in flight); pooled starts can be made to fail."""

    def __init__(self, *, pooled_fail: bool = False, **kwargs: Any) -> None:
        super().__init__(defaults={"init_delay": 0.05}, **kwargs)
        self.pooled_fail = pooled_fail

    async def initialize(self, setup: SessionSetup[FakeConfig]) -> FakeState:
        pooled = setup.worker_id == LOCAL_PRINCIPAL and not setup.session_id.startswith("tmp-")
        if self.pooled_fail and pooled:
            raise RuntimeError("pooled start refused for this test")
        return await super().initialize(setup)


async def test_a_pooled_session_is_never_handed_to_two_workers() -> None:
    backend = SlowStarts()
    async with Engine({"fake": backend}, pools={"fake": 3}) as engine:
        pool = engine.warm["fake"]
        await eventually(lambda: len(pool.ready) == 3, BOUNDED)
        states: dict[str, int] = {}

        async def create(i: int) -> None:
            [(view, created)] = await engine.create_sessions(Caller(worker=f"w{i}"), "fake")
            assert created
            states[view.session_id] = id(engine.sessions[view.session_id].state)

        # More callers than the pool holds, in waves, so some take ready members, some claim
        # members still starting, and the rest start their own.
        for wave in range(3):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(create, wave * 8 + i)
        assert len(states) == 24
        assert len(set(states.values())) == 24  # every session has its own state
        assert pool.taken >= 3
        handed = {id(engine.sessions[sid].state) for sid in states}
        assert not handed & {id(member.state) for member in pool.ready}  # nothing handed out is still pooled
        assert not pool.claimed


async def test_an_empty_pool_never_fails_a_call() -> None:
    backend = SlowStarts(pooled_fail=True)
    async with Engine({"fake": backend}, pools={"fake": 2}) as engine:
        pool = engine.warm["fake"]
        await eventually(lambda: pool.failures >= 1, BOUNDED)
        assert not pool.ready
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(engine.create_sessions, Caller(worker=f"w{i}"), "fake")
        assert len(engine.sessions) == 4
        temporary = (await engine.call(Caller(worker="t"), "fake_get", {"key": "k"})).envelope
        assert temporary.ok, temporary.message
        assert engine.status()["warm_pools"]["fake"]["failures"] >= 1


async def test_a_claimer_that_gives_up_leaves_the_member_to_the_pool() -> None:
    backend = SlowStarts()
    async with Engine({"fake": backend}, pools={"fake": 1}) as engine:
        pool = engine.warm["fake"]
        await eventually(lambda: len(pool.launched) == 1, BOUNDED)
        with anyio.move_on_after(0.001):
            await engine.create_sessions(Caller(worker="impatient"), "fake")
        assert not pool.claimed
        await eventually(lambda: len(pool.ready) == 1, BOUNDED)
        assert engine.budget.live == 0
        assert not engine.sessions


@pytest.mark.parametrize("count", [1, 5])
async def test_temporary_calls_take_pooled_shells_and_never_reuse_one(count: int) -> None:
    async with sandboxed_bash(pool=2) as engine:
        pool = engine.warm["bash"]
        await eventually(lambda: len(pool.ready) == 2, BOUNDED)
        client = Client(engine, "temp")
        seen: list[str] = []
        for _ in range(count):
            envelope = await client.bash("echo $AGENTFLOW_SESSION; echo x > ~/mark; ls ~")
            assert envelope.ok, envelope.message
            label, listing = envelope.data["stdout"].split(maxsplit=1)
            assert listing.split() == ["mark"]  # a fresh home each time: nothing of an earlier call
            seen.append(label)
        assert len(set(seen)) == count


async def test_pooled_shells_wait_at_background_priority_and_callers_commands_run_at_normal_priority() -> None:
    normal = os.getpriority(os.PRIO_PROCESS, 0)
    async with sandboxed_bash(pool=2) as engine:
        pool = engine.warm["bash"]
        await eventually(lambda: len(pool.ready) == 2, BOUNDED)
        members = {member.label: member.state.sandbox.pids() for member in pool.ready}
        for member in pool.ready:
            shell = member.state.shell.shell_pid()
            assert shell in members[member.label]
            assert {nice_of(pid) for pid in members[member.label]} == {POOL_NICE}
        client = Client(engine, "owner")
        sid = await client.create()
        session = engine.sessions[sid]
        assert session.label in members
        assert nice_of(session.state.shell.shell_pid()) == normal
        assert {nice_of(pid) for pid in session.state.sandbox.pids()} == {normal}
        assert nice_in_stat(await client.out(OWN_STAT, sid)) == normal
        # A temporary call takes the other member: its command runs at normal priority too.
        envelope = await client.bash(f"echo $AGENTFLOW_SESSION; {OWN_STAT}")
        assert envelope.ok, envelope.message
        label, stat = envelope.data["stdout"].split("\n", 1)
        assert label in members
        assert nice_in_stat(stat) == normal


class GatedPoolStarts(BashBackend):
    """Real sandboxed shells whose pooled starts wait for the test (so a caller claims one mid-start)."""

    def __init__(self) -> None:
        super().__init__("bash", policy=SANDBOX)
        self.gate = anyio.Event()

    async def initialize(self, setup: SessionSetup[Any]) -> Any:
        if setup.pooled:
            await self.gate.wait()
        return await super().initialize(setup)


async def test_a_shell_claimed_while_it_starts_gets_normal_priority_before_the_callers_command() -> None:
    normal = os.getpriority(os.PRIO_PROCESS, 0)
    backend = GatedPoolStarts()
    async with sandboxed_bash(pool=1, backend=backend) as engine:
        pool = engine.warm["bash"]
        await eventually(lambda: pool.launched, BOUNDED)
        client = Client(engine, "claimer")
        result: list[Any] = []

        async def claim() -> None:
            result.append(await client.bash(f"echo $AGENTFLOW_SESSION; {OWN_STAT}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim)
            await eventually(lambda: pool.claimed, BOUNDED)
            member = next(iter(pool.claimed))
            backend.gate.set()
        [envelope] = result
        assert envelope.ok, envelope.message
        label, stat = envelope.data["stdout"].split("\n", 1)
        assert label == member.label
        assert nice_in_stat(stat) == normal
        assert pool.taken == 1


async def test_a_burst_beyond_the_cap_grows_the_pool_and_shutdown_kills_the_grown_pool() -> None:
    async with sandboxed_bash(pool=PoolSize(2, 5)) as engine:
        pool = engine.warm["bash"]
        await eventually(lambda: len(pool.ready) == 2, BOUNDED)
        clients = [Client(engine, f"w{i}") for i in range(8)]
        handles: list[str] = []

        async def create(client: Client) -> None:
            handles.append(await client.create())

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(create, client)
        assert len(set(handles)) == 8  # the two ready ones were taken, the rest started their own
        for client, sid in zip(clients, handles, strict=False):
            assert (await client.out("echo ok", sid)).strip() == "ok"
        assert pool.target == 5
        await eventually(lambda: len(pool.ready) == 5 and not pool.starting, BOUNDED)
        labels = [member.label for member in pool.ready] + [engine.sessions[sid].label for sid in handles]
        pids = [pid for member in pool.ready for pid in member.state.sandbox.pids()]
    for label in labels:
        assert run_pids(label) == []
        assert run_cgroup_dirs(label) == []
    assert not [pid for pid in pids if pid_alive(pid)]
    assert engine.budget.live == 0
