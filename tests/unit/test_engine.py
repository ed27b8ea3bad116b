"""The session engine against an in-process fake backend: semantics, isolation, concurrency, TTL.

Tests taking the `executor` fixture run twice: on the local engine and through a Ray front
end on a real single-node cluster (`tests/executors.py`). The few that reach into a
session's state object or the engine's own methods (not reachable through a front end's
tool calls) run on the local engine only; each says so.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from backends.base import BackendKind
from session.engine import Engine, _remove_shallow
from session.errors import ParameterError, ResourceTypeNotFound, ResourceUnavailable, SessionError
from tests.executors import FAKES, TWO_FAKES, manifest_of
from tests.fakes import FakeBackend, SharedFake
from tests.support.polling import eventually


def make_engine() -> Engine:
    # Entered inside each test, not in a fixture: an engine owns a task group, which must be
    # entered and left by the same task (pytest-asyncio runs fixture setup and teardown apart).
    return Engine({"fake": FakeBackend(), "search": SharedFake()}, session_ttl=300)


def fake(engine: Engine) -> FakeBackend:
    backend = engine.backends["fake"]
    assert isinstance(backend, FakeBackend)
    return backend


async def test_backend_kinds_follow_the_hooks_they_override():
    assert FakeBackend.kind() is BackendKind.SESSION
    assert SharedFake.kind() is BackendKind.SHARED


async def test_explicit_session_keeps_state_between_calls(executor):
    async with executor(manifest_of(FAKES)) as engine:
        [(view, created)] = await engine.create_sessions("w1", "fake", {"label": "mine", "custom_name": "n"})
        assert created
        assert view.session_name == "n"
        assert (await engine.call_tool("w1", "fake:set", {"key": "a", "value": 1})).envelope.code == 0
        got = (await engine.call_tool("w1", "fake_get", {"key": "a"})).envelope
        assert got.data == {"value": 1, "label": "mine"}
        assert got.meta.session_id == view.session_id
        assert got.meta.temporary_session is False
        assert got.meta.expires_at is not None


async def test_temporary_sessions_are_fresh_private_and_unlisted(executor):
    async with executor(manifest_of(FAKES)) as engine:
        first = (await engine.call_tool("w1", "fake:set", {"key": "a", "value": 1})).envelope
        second = (await engine.call_tool("w1", "fake:get", {"key": "a"})).envelope
        assert first.meta.temporary_session
        assert second.meta.temporary_session
        assert first.meta.session_id != second.meta.session_id
        assert second.data["value"] is None
        assert await engine.list_sessions("w1") == []
        assert await engine.backend_attr("fake", "live") == set()


async def test_concurrent_temporary_calls_of_one_worker_never_share_a_session(executor):
    async with executor(manifest_of(FAKES)) as engine:
        results = []

        async def call(seq: int) -> None:
            results.append((await engine.call_tool("w1", "fake:work", {"seq": seq, "seconds": 0.05})).envelope)

        async with anyio.create_task_group() as tg:
            for seq in range(10):
                tg.start_soon(call, seq)
        assert all(r.code == 0 for r in results)
        assert len({r.meta.session_id for r in results}) == 10
        assert await engine.backend_attr("fake", "live") == set()


async def test_calls_on_one_session_run_one_at_a_time_in_arrival_order():
    # Local only: it reads the session's state object. (Through Ray, concurrent calls reach a
    # host in no order the caller fixes; the session's FIFO lock on the host is this same code.)
    async with make_engine() as engine:
        await engine.create_sessions("w1", "fake")
        state = engine.workers["local/w1"].sessions["fake"].state
        async with anyio.create_task_group() as tg:
            for seq in range(8):
                tg.start_soon(engine.call_tool, "w1", "fake:work", {"seq": seq, "seconds": 0.01})
                await anyio.lowlevel.checkpoint()  # fix the arrival order
        assert state.max_running == 1
        assert state.order == list(range(8))


async def test_calls_on_different_sessions_run_in_parallel():
    # Local only: it reads the sessions' state objects while their calls run.
    async with make_engine() as engine:
        await engine.create_sessions("w1", "fake")
        await engine.create_sessions("w2", "fake")
        states = [engine.workers[f"local/{w}"].sessions["fake"].state for w in ("w1", "w2")]
        gate = anyio.Event()

        async def call(worker: str) -> None:
            await engine.call_tool(worker, "fake:work", {"seconds": 0.2})

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "w1")
            tg.start_soon(call, "w2")
            await eventually(lambda: all(s.running for s in states), 5)
            gate.set()


async def test_slow_initialize_of_one_worker_does_not_delay_another_workers_calls():
    # Local only: it holds the backend's gate (an in-process event); the next test covers the
    # same guarantee on both executors with a slow initialize instead.
    async with make_engine() as engine:
        await engine.create_sessions("fast", "fake")
        backend = fake(engine)
        backend.gate = anyio.Event()  # worker "slow" stalls inside initialize until we say so
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.create_sessions, "slow", "fake", {"label": "gated"})
            await eventually(lambda: ("initialize", "local/slow") in backend.events, 5, every=0.001)
            # while "slow" is stuck in initialize, "fast" gets through create, call, list, refresh, destroy
            with anyio.fail_after(1):
                assert (await engine.call_tool("fast", "fake:set", {"key": "k", "value": 2})).envelope.code == 0
                engine.list_sessions("fast")
                engine.refresh_sessions("fast")
                await engine.create_sessions("third", "fake", {"label": "x"})
                await engine.destroy_sessions("fast", ["fake"])
            backend.gate.set()
        assert engine.list_sessions("slow")[0].status == "active"


async def test_a_slow_initialize_does_not_block_other_workers(executor):
    async with executor(manifest_of(FAKES)) as engine:
        await engine.create_sessions("b", "fake")
        started = anyio.Event()
        finished_b = anyio.Event()

        async def slow_create() -> None:
            started.set()
            await engine.create_sessions("a", "fake", {"init_delay": 120.0})

        async def b_calls() -> None:
            await started.wait()
            for _ in range(20):
                assert (await engine.call_tool("b", "fake:get", {"key": "x"})).envelope.code == 0
            finished_b.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_create)
            tg.start_soon(b_calls)
            await finished_b.wait()
            # B finished all its calls while A is still inside its initialize (an ordering, not
            # a timing: the initialize never ends by itself within the test's time limit)
            assert [v.status for v in await engine.list_sessions("a")] == ["creating"]
            tg.cancel_scope.cancel()


async def test_workers_are_isolated(executor):
    async with executor(manifest_of(FAKES)) as engine:
        await engine.create_sessions("a", "fake")
        await engine.call_tool("a", "fake:set", {"key": "secret", "value": 7})
        assert await engine.list_sessions("b") == []
        with pytest.raises(SessionError, match="no 'fake' session"):
            await engine.destroy_sessions("b", ["fake"])
        seen = (await engine.call_tool("b", "fake:get", {"key": "secret"})).envelope
        assert seen.data["value"] is None
        assert seen.meta.temporary_session
        assert (await engine.list_sessions("a"))[0].status == "active"


async def test_create_accepts_one_a_list_or_a_mapping(executor):
    async with executor(manifest_of(TWO_FAKES)) as engine:
        await engine.create_sessions("w1", "fake")
        await engine.create_sessions("w2", ["fake", "other"])
        await engine.create_sessions("w3", {"fake": {"label": "m"}, "other": None})
        assert {v.resource_type for v in await engine.list_sessions("w2")} == {"fake", "other"}
        assert (await engine.call_tool("w3", "fake:get", {"key": "k"})).envelope.data["label"] == "m"
        again = await engine.create_sessions("w1", "fake")
        assert again[0][1] is False  # existed: kept, not re-created
        destroyed = await engine.destroy_sessions("w2")
        assert len(destroyed) == 2
        assert await engine.list_sessions("w2") == []


async def test_failed_initialize_rolls_back_and_is_not_sticky(executor):
    async with executor(manifest_of(FAKES)) as engine:
        with pytest.raises(SessionError, match="init exploded"):
            await engine.create_sessions("w1", "fake", {"fail_init": True})
        assert await engine.list_sessions("w1") == []
        await engine.create_sessions("w1", "fake")
        assert (await engine.list_sessions("w1"))[0].status == "active"


async def test_multi_create_is_all_or_nothing(executor):
    async with executor(manifest_of(TWO_FAKES)) as engine:
        with pytest.raises(SessionError):
            await engine.create_sessions("w1", {"fake": None, "other": {"fail_init": True}})
        assert await engine.list_sessions("w1") == []
        assert await engine.backend_attr("fake", "live") == set()


async def test_bad_config_and_unknown_resource_are_parameter_and_resource_errors(executor):
    async with executor(manifest_of(FAKES)) as engine:
        with pytest.raises(ParameterError, match="'nope' is not a known field"):
            await engine.create_sessions("w1", "fake", {"nope": 1})
        with pytest.raises(ResourceTypeNotFound, match="this server has: fake, search"):
            await engine.create_sessions("w1", "vmx")
        with pytest.raises(ParameterError, match="shared backend"):
            await engine.create_sessions("w1", "search")


async def test_errors_come_back_as_envelopes_with_the_spec_codes(executor):
    async with executor(manifest_of(FAKES)) as engine:
        cases = {
            ("fake:nope", None): 1001,
            ("ghost_run", None): 1001,
            ("no_such_tool", None): 1001,
            ("fake:set", "missing"): 1002,
            ("fake:set", "wrong-type"): 1002,
            ("fake:boom", None): 2001,
        }
        args = {"missing": {"key": "a"}, "wrong-type": {"key": "a", "value": "x"}, None: {}}
        for (name, which), code in cases.items():
            env = (await engine.call_tool("w1", name, args[which])).envelope
            assert env.code == code, (name, env)
            assert env.message
            assert "Traceback" not in env.message
        boom = (await engine.call_tool("w1", "fake:boom", {})).envelope
        assert "ZeroDivisionError: divided by zero" in boom.message


async def test_broken_session_reports_1003_instead_of_hanging():
    # Local only: it breaks the session's state object directly.
    async with make_engine() as engine:
        await engine.create_sessions("w1", "fake")
        engine.workers["local/w1"].sessions["fake"].state.broken = "the X server died"
        env = (await engine.call_tool("w1", "fake:get", {"key": "a"})).envelope
        assert env.code == 1003
        assert "the X server died" in env.message
        assert "reinitialize" in env.message


async def test_reinitialize_replaces_one_session_and_leaves_others(executor):
    async with executor(manifest_of(TWO_FAKES)) as engine:
        await engine.create_sessions("w1", {"fake": {"label": "old"}, "other": None})
        await engine.call_tool("w1", "other:set", {"key": "keep", "value": 1})
        old_id = next(v.session_id for v in await engine.list_sessions("w1") if v.resource_type == "fake")
        result = await engine.reinitialize("w1", "fake", {"label": "new"})
        assert result["status"] == "success"
        assert result["old_session_id"] == old_id
        assert result["new_session_id"] != old_id
        assert result["config_applied"] == {"label": "new"}
        assert (await engine.call_tool("w1", "fake:get", {"key": "a"})).envelope.data["label"] == "new"
        assert (await engine.call_tool("w1", "other:get", {"key": "keep"})).envelope.data["value"] == 1
        assert len(await engine.backend_attr("fake", "live")) == 1


async def test_reinitialize_with_a_bad_config_keeps_the_old_session(executor):
    async with executor(manifest_of(FAKES)) as engine:
        await engine.create_sessions("w1", "fake", {"label": "old"})
        with pytest.raises(SessionError):
            await engine.reinitialize("w1", "fake", {"fail_init": True})
        assert (await engine.call_tool("w1", "fake:get", {"key": "a"})).envelope.data["label"] == "old"


async def test_idle_sessions_expire_after_the_ttl_and_calls_refresh_it(executor):
    # TTL and gaps chosen so a loaded machine stalling the loop 0.7 s still passes
    async with executor(manifest_of({"fake": FAKES["fake"]}, session_ttl=1.0)) as engine:
        await engine.create_sessions("w1", "fake")
        for _ in range(5):  # 1.5 s of activity (longer than the TTL): each call pushes the deadline
            await anyio.sleep(0.3)  # the gap between calls is what is under test
            assert (await engine.call_tool("w1", "fake:get", {"key": "a"})).envelope.meta.temporary_session is False
        await eventually(lambda: _none(engine.list_sessions("w1")))
        assert await engine.backend_attr("fake", "live") == set()
        assert ("cleanup", "local/w1") in await engine.backend_attr("fake", "events")


async def test_refresh_sessions_extends_the_lease(executor):
    async with executor(manifest_of({"fake": FAKES["fake"]}, session_ttl=1.0)) as engine:
        await engine.create_sessions("w1", "fake")
        for _ in range(4):  # 1.2 s, longer than the TTL
            await anyio.sleep(0.3)
            await engine.refresh_sessions("w1", "fake")
        assert await engine.list_sessions("w1")
        await engine.refresh_sessions("w1")
        assert (await engine.list_sessions("w1"))[0].expires_at is not None


async def test_a_session_with_a_call_in_progress_is_never_reaped(executor):
    async with executor(manifest_of({"fake": FAKES["fake"]}, session_ttl=1.0)) as engine:
        await engine.create_sessions("w1", "fake")
        env = (await engine.call_tool("w1", "fake:work", {"seconds": 2.0})).envelope
        assert env.code == 0
        assert not env.meta.temporary_session
        assert await engine.list_sessions("w1")  # the TTL counts from the end of the call


async def test_destroy_during_a_call_cancels_it_with_a_session_error(executor):
    async with executor(manifest_of(FAKES)) as engine:
        await engine.create_sessions("w1", "fake")
        result = {}

        async def long_call() -> None:
            result["env"] = (await engine.call_tool("w1", "fake:work", {"seconds": 30})).envelope

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            await eventually(lambda: _equals(engine.backend_attr("fake", "working"), 1), what="the call to start")
            with anyio.fail_after(15):
                await engine.destroy_sessions("w1", ["fake"])
        assert result["env"].code == 1003
        assert "destroyed during this call" in result["env"].message


async def test_shared_backend_warms_once(executor):
    async with executor(manifest_of(FAKES)) as engine:
        one = (await engine.call_tool("w1", "search:query", {"key": "q"})).envelope
        two = (await engine.call_tool("w2", "search_query", {"key": "q"})).envelope
        assert one.data == {"echo": "q", "warmups": 1}
        assert two.data["warmups"] == 1
        assert one.meta.session_id is None
        assert await engine.warmup(["search"]) == {"search": "already warm"}


async def test_shared_backend_shuts_down_with_the_engine():
    # Local only: on Ray the backend object lives in its host, which stops with the deployment.
    shared = SharedFake()
    async with Engine({"search": shared, "fake": FakeBackend()}) as engine:
        await engine.call_tool("w1", "search:query", {"key": "q"})
    assert shared.shutdowns == 1


async def test_engine_exit_destroys_every_session():
    # Local only: a Ray front end's exit leaves the sessions to the cluster (by design).
    backend = FakeBackend()
    async with Engine({"fake": backend}) as engine:
        for worker in ("a", "b", "c"):
            await engine.create_sessions(worker, "fake")
        assert len(backend.live) == 3
    assert backend.live == set()


async def test_close_worker_destroys_its_sessions_only():
    # Local only: close_worker is the in-process Sandbox's call, not a tool.
    async with make_engine() as engine:
        await engine.create_sessions("a", "fake")
        await engine.create_sessions("b", "fake")
        await engine.close_worker("a")
        assert engine.list_sessions("a") == []
        assert len(engine.list_sessions("b")) == 1
        assert len(fake(engine).live) == 1


async def test_session_limits_give_resource_unavailable(executor):
    async with executor(manifest_of({"fake": FAKES["fake"]}, per_resource={"fake": 1})) as engine:
        await engine.create_sessions("a", "fake")
        with pytest.raises(ResourceUnavailable, match="limit of 1"):
            await engine.create_sessions("b", "fake")
        env = (await engine.call_tool("c", "fake:get", {"key": "k"})).envelope
        assert env.code == 2004
        await engine.destroy_sessions("a")
        await engine.create_sessions("b", "fake")


async def test_images_travel_beside_the_envelope(executor):
    async with executor(manifest_of(FAKES)) as engine:
        outcome = await engine.call_tool("w1", "fake:picture", {})
        assert outcome.envelope.data == {"width": 1, "height": 1}
        assert outcome.images[0].data.startswith(b"\x89PNG")


async def _none(views) -> bool:
    return not await views


async def _equals(value, expected) -> bool:
    return await value == expected


def test_a_shallow_scratch_is_removed_inline_and_a_deep_one_left_for_the_tree_walk(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the session's")
    shallow = tmp_path / "shallow"
    (shallow / "home").mkdir(parents=True)
    (shallow / "link").symlink_to(outside)  # removed as a link, never followed
    (shallow / "note").write_text("x")
    assert _remove_shallow(shallow)
    assert not shallow.exists()
    assert (outside / "keep.txt").read_text() == "not the session's"

    deep = tmp_path / "deep"
    (deep / "profile" / "cache").mkdir(parents=True)
    assert not _remove_shallow(deep)
    assert (deep / "profile" / "cache").is_dir()

    large = tmp_path / "large"
    large.mkdir()
    (large / "framebuffer").write_bytes(b"\0" * (2 << 20))
    assert not _remove_shallow(large)
    assert (large / "framebuffer").stat().st_size == 2 << 20

    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for i in range(9):
        (crowded / f"f{i}").touch()
    assert not _remove_shallow(crowded)
    assert len(list(crowded.iterdir())) == 9  # untouched: the worker thread removes it

    assert _remove_shallow(tmp_path / "never-made")
