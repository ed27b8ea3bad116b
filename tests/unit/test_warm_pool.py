"""The warm pool's size policy and refill scheduling, with the in-process fake backend.

Time is the test's: the engine and its pools read a `ManualClock` the tests move (and then
`Engine.wake_pools()`), so growth windows and decay periods are exact and nothing sleeps.
Background work (refill starts, surplus stops) is awaited with bounded polls.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from backends.base import SessionSetup
from manifests.loader import parse_manifest
from mcp_server.factory import engine_from_manifest
from session.engine import Engine
from session.errors import ConfigurationError
from session.models import Caller
from session.warm_pool import GROW_WINDOW, PoolSize, WarmPool
from tests.fakes import FakeBackend, FakeConfig, FakeState
from tests.support.polling import eventually

BOUNDED = 10.0


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PoolAware(FakeBackend):
    """Records which sessions were started for the pool and which were handed out (and when)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pooled: set[int] = set()
        self.handed: list[int] = []
        self.pooled_gate: anyio.Event | None = None
        self.cleanup_gate: anyio.Event | None = None
        self.cleaning = 0

    async def initialize(self, setup: SessionSetup[FakeConfig]) -> FakeState:
        if setup.pooled and self.pooled_gate is not None:
            await self.pooled_gate.wait()
        state = await super().initialize(setup)
        if setup.pooled:
            self.pooled.add(id(state))
        return state

    async def cleanup(self, setup: SessionSetup[FakeConfig], state: FakeState) -> None:
        if self.cleanup_gate is not None:
            self.cleaning += 1
            await self.cleanup_gate.wait()
        await super().cleanup(setup, state)

    async def handed_out(self, state: FakeState) -> None:
        assert id(state) in self.pooled, "handed_out is only for pool members"
        self.handed.append(id(state))


def pool_of(engine: Engine) -> WarmPool:
    return engine.warm["fake"]


async def full(engine: Engine, count: int) -> None:
    pool = pool_of(engine)
    await eventually(lambda: len(pool.ready) == count and not pool.starting, BOUNDED, what=lambda: f"{pool.describe()}")


async def burst(engine: Engine, count: int, prefix: str = "w") -> list[str]:
    handles: list[str] = []

    async def create(i: int) -> None:
        [(view, created)] = await engine.create_sessions(Caller(worker=f"{prefix}{i}"), "fake")
        assert created
        handles.append(view.session_id)

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(create, i)
    return handles


def test_the_target_is_the_largest_demand_in_a_window_within_base_and_cap() -> None:
    clock = ManualClock()
    pool = WarmPool("fake", PoolSize(2, 10, decay=60), clock)
    assert (pool.target, pool.base, pool.cap) == (2, 2, 10)
    for _ in range(5):
        pool.demand()
    assert pool.target == 5
    # Demand spread wider than the window does not add up.
    clock.advance(GROW_WINDOW + 0.1)
    for _ in range(3):
        pool.demand()
    assert pool.target == 5  # the earlier peak still counts (within the decay period)
    for _ in range(20):
        pool.demand()
    assert pool.target == 10  # capped
    clock.advance(59)
    assert pool.target == 10
    clock.advance(1.1)
    assert pool.target == 2  # every peak is older than the decay period: back to base
    assert pool.next_change() is None


def test_a_smaller_later_peak_keeps_the_pool_until_it_ages_out_too() -> None:
    clock = ManualClock()
    pool = WarmPool("fake", PoolSize(1, 50, decay=30), clock)
    for _ in range(20):
        pool.demand()
    clock.advance(20)
    for _ in range(6):
        pool.demand()
    assert pool.target == 20
    assert pool.next_change() == pytest.approx(clock.now - 20 + 30)
    clock.advance(10.5)  # the 20 aged out, the 6 has not
    assert pool.target == 6
    clock.advance(20)
    assert pool.target == 1


def test_pool_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="base <= cap"):
        PoolSize(4, 2)
    with pytest.raises(ValueError, match="decay > 0"):
        PoolSize(4, 8, decay=0)
    assert PoolSize.of(3) == PoolSize(3)  # a bare number: a fixed-size pool
    assert WarmPool("fake", PoolSize(3), ManualClock()).cap == 3


async def test_a_burst_grows_the_pool_to_its_size_and_the_next_burst_takes_ready_sessions() -> None:
    backend, clock = PoolAware(), ManualClock()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(2, 30, decay=60)}, clock=clock) as engine:
        pool = pool_of(engine)
        await full(engine, 2)
        first = await burst(engine, 12, "a")
        assert len(set(first)) == 12
        assert pool.taken + pool.misses == 12
        assert pool.misses >= 10  # only two were ready
        assert pool.target == 12
        await full(engine, 12)
        status = engine.status()["warm_pools"]["fake"]
        assert {k: status[k] for k in ("target", "base", "cap", "ready", "starting")} == {
            "target": 12,
            "base": 2,
            "cap": 30,
            "ready": 12,
            "starting": 0,
        }
        misses = pool.misses
        clock.advance(GROW_WINDOW + 1)  # the next wave, later
        second = await burst(engine, 12, "b")
        assert len(set(second)) == 12
        assert pool.misses == misses  # every one of the second wave took a ready session
        assert len(backend.handed) == pool.taken
        assert engine.budget.live == 24  # pool members count against nothing; taken ones do


async def test_growth_waits_while_the_server_is_busy_and_then_starts_one_at_a_time() -> None:
    backend, clock = PoolAware(), ManualClock()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(2, 12, decay=60)}, clock=clock) as engine:
        busy = True
        engine.server_busy = lambda: busy
        pool = pool_of(engine)
        await full(engine, 2)  # the base refills however busy the server is
        await burst(engine, 10)
        assert pool.target == 10
        await full(engine, 2)  # refilled to its base, no further
        await anyio.wait_all_tasks_blocked()
        assert (len(pool.ready), len(pool.starting)) == (2, 0)
        # The server calms down: growth proceeds, never more than one member starting at once.
        backend.pooled_gate = anyio.Event()
        busy = False
        engine.wake_pools()
        await eventually(lambda: len(pool.starting) == 1, BOUNDED, what=lambda: f"{pool.describe()}")
        await anyio.wait_all_tasks_blocked()
        assert len(pool.starting) == 1
        backend.pooled_gate.set()
        backend.pooled_gate = None
        await full(engine, 10)


async def test_a_burst_beyond_the_cap_still_works_and_the_pool_stops_at_the_cap() -> None:
    backend, clock = PoolAware(), ManualClock()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(2, 5, decay=60)}, clock=clock) as engine:
        await full(engine, 2)
        handles = await burst(engine, 20)
        assert len(set(handles)) == 20  # the rest started their own sessions
        assert pool_of(engine).target == 5
        await full(engine, 5)
        assert engine.status()["warm_pools"]["fake"]["cap"] == 5
    assert not backend.live


async def test_a_grown_pool_decays_to_its_base_stopping_the_oldest_idle_members() -> None:
    backend, clock = PoolAware(), ManualClock()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(2, 8, decay=60)}, clock=clock) as engine:
        pool = pool_of(engine)
        await full(engine, 2)
        await burst(engine, 6)
        await full(engine, 6)
        order = [id(member.state) for member in pool.ready]
        clock.advance(59)
        engine.wake_pools()
        await anyio.wait_all_tasks_blocked()
        assert len(pool.ready) == 6  # still within the decay period
        clock.advance(2)
        engine.wake_pools()
        await full(engine, 2)
        assert [id(member.state) for member in pool.ready] == order[-2:]  # the two newest stay
        stopped = set(order[:-2])
        await eventually(lambda: not stopped & backend.live, BOUNDED, what="the surplus members' cleanup")
        assert pool.target == 2
        assert engine.budget.live == 6  # the callers' sessions are untouched


async def test_shutdown_while_grown_stops_every_member_ready_or_starting() -> None:
    backend, clock = PoolAware(), ManualClock()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(2, 16, decay=60)}, clock=clock) as engine:
        pool = pool_of(engine)
        await full(engine, 2)
        await burst(engine, 12)
        await eventually(lambda: len(pool.ready) >= 4, BOUNDED)
        backend.pooled_gate = anyio.Event()  # later starts hang until shutdown lets them finish
        await burst(engine, 4, "x")
        await eventually(lambda: pool.starting, BOUNDED)
        backend.pooled_gate.set()
    assert not backend.live
    assert engine.budget.live == 0


async def test_shutdown_during_a_shrink_stops_the_surplus_not_yet_stopped() -> None:
    backend, clock = PoolAware(), ManualClock()
    engine = Engine({"fake": backend}, pools={"fake": PoolSize(1, 6, decay=10)}, clock=clock)
    async with anyio.create_task_group() as outside, engine:
        pool = pool_of(engine)
        await full(engine, 1)
        handles = await burst(engine, 6)
        await full(engine, 6)
        for handle in handles:  # only the pool's members are left
            await engine.destroy_sessions(Caller(), session_id=handle)
        backend.cleanup_gate = anyio.Event()
        clock.advance(11)
        engine.wake_pools()
        # The shrink stops its five one after another: the first hangs in cleanup.
        await eventually(lambda: backend.cleaning == 1, BOUNDED)
        assert len(pool.retiring) == 5

        async def release_once_stopping() -> None:
            await eventually(lambda: engine._stopping, BOUNDED)
            assert backend.cleanup_gate is not None
            backend.cleanup_gate.set()

        outside.start_soon(release_once_stopping)
    assert not pool.retiring
    assert not backend.live


async def test_refill_waits_only_while_a_burst_beyond_the_pool_waits_for_its_own_starts() -> None:
    backend = PoolAware()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(2)}) as engine:
        engine.refill_defer_above = 1
        pool = pool_of(engine)
        await full(engine, 2)
        backend.gate = anyio.Event()

        async def own_start(i: int) -> None:
            # Its own config: a fresh start that hangs on the gate, a caller waiting for it.
            await engine.create_sessions(Caller(worker=f"slow{i}"), "fake", {"label": "gated"})

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(own_start, i)
            await eventually(lambda: engine.cold_starts == 2, BOUNDED)
            await burst(engine, 1)
            # Two callers wait for starts of their own: no more than the pool is sized for (steady
            # load it serves), so the refill goes on.
            await full(engine, 2)
            tg.start_soon(own_start, 2)
            await eventually(lambda: engine.cold_starts == 3, BOUNDED)
            await burst(engine, 2, "more")
            await anyio.wait_all_tasks_blocked()
            assert (len(pool.ready), len(pool.starting)) == (0, 0)  # three: more than cores and target
            backend.gate.set()
        await full(engine, 2)


async def test_a_member_claimed_while_starting_is_handed_out_before_the_caller_gets_it() -> None:
    backend, clock = PoolAware(), ManualClock()
    async with Engine({"fake": backend}, pools={"fake": PoolSize(1)}, clock=clock) as engine:
        backend.pooled_gate = anyio.Event()
        pool = pool_of(engine)
        await eventually(lambda: pool.launched, BOUNDED)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.create_sessions, Caller(worker="claimer"), "fake")
            await eventually(lambda: pool.claimed, BOUNDED)
            assert not backend.handed
            backend.pooled_gate.set()
        [session] = engine.sessions.values()
        assert backend.handed == [id(session.state)]
        assert session.setup is not None
        assert session.setup.pooled
        assert pool.taken == 1
        assert pool.misses == 0


async def test_a_session_with_its_own_config_is_not_pooled_not_handed_out_and_not_demand() -> None:
    backend = PoolAware()
    async with Engine({"fake": backend}, pools={"fake": 1}) as engine:
        await full(engine, 1)
        [(view, _)] = await engine.create_sessions(Caller(worker="w"), "fake", {"label": "mine"})
        setup = engine.sessions[view.session_id].setup
        assert setup is not None
        assert not setup.pooled
        assert not backend.handed
        status = engine.status()["warm_pools"]["fake"]
        assert (status["taken"], status["misses"], status["target"]) == (0, 0, 1)  # not demand for the pool


def test_the_manifest_sets_base_cap_and_decay_and_refuses_a_cap_below_the_base() -> None:
    raw = {"resources": {"bash": {"pool": 4, "pool_max": 32, "pool_decay": 30}}}
    engine = engine_from_manifest(parse_manifest(raw))
    assert engine.warm["bash"].size == PoolSize(4, 32, 30.0)
    default = engine_from_manifest(parse_manifest({"resources": {"bash": {"pool": 8}}}))
    assert default.warm["bash"].size.cap == 64
    assert not engine_from_manifest(parse_manifest({"resources": {"bash": {"pool": 0}}})).warm
    with pytest.raises(ConfigurationError, match=r"resources\.bash: .*pool_max \(4\) must be at least pool \(8\)"):
        parse_manifest({"resources": {"bash": {"pool": 8, "pool_max": 4}}})
    with pytest.raises(ConfigurationError, match=r"pool_max needs pool >= 1"):
        parse_manifest({"resources": {"bash": {"pool_max": 4}}})
    with pytest.raises(ConfigurationError, match=r"resources\.bash\.pool_decay"):
        parse_manifest({"resources": {"bash": {"pool": 2, "pool_decay": 0}}})
