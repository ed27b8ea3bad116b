"""Session handles, principals, the disconnect grace, caps, operator policy and result bounds.

Tests taking the `executor` fixture run on the local engine and through a Ray front end
(`tests/executors.py`); the others say why they are local only.
"""

from __future__ import annotations

import json

import anyio
import pytest

from backends.policy import Policy
from session.engine import Engine, Limits
from session.errors import PermissionDenied, ResourceUnavailable, SessionError
from session.models import Caller
from session.tool_calls import RESULT_BUDGET
from tests.executors import manifest_of
from tests.fakes import FakeBackend
from tests.support.polling import eventually

ALICE = Caller("alice", "w-alice")
ALICE_OTHER_CONNECTION = Caller("alice", "w-alice-2")
ALICE_NO_WORKER = Caller("alice", None)
BOB = Caller("bob", "w-bob")


FAKE = {"fake": "tests.fakes.FakeBackend"}


def make_engine(**kwargs: object) -> Engine:
    return Engine({"fake": FakeBackend()}, **kwargs)  # type: ignore[arg-type]


async def _not(value: object) -> bool:
    return not await value  # type: ignore[misc]


async def _equals(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_handles_are_unguessable_and_work_from_any_connection_of_the_principal(executor):
    async with executor(manifest_of(FAKE)) as engine:
        [(view, _)] = await engine.create_sessions(ALICE, "fake")
        handle = view.session_id
        assert len(handle.partition("-")[2]) >= 22  # 128 bits in base64url
        await engine.call(ALICE, "fake_set", {"key": "k", "value": 7})
        got = (await engine.call(ALICE_OTHER_CONNECTION, "fake_get", {"key": "k", "session_id": handle})).envelope
        assert got.code == 0
        assert got.data["value"] == 7
        assert got.meta.session_id == handle
        stateless = (await engine.call(ALICE_NO_WORKER, "fake_get", {"key": "k", "session_id": handle})).envelope
        assert stateless.data["value"] == 7


async def test_another_principals_handle_and_an_unknown_one_get_the_same_answer(executor):
    async with executor(manifest_of(FAKE)) as engine:
        [(view, _)] = await engine.create_sessions(ALICE, "fake")
        foreign = (await engine.call(BOB, "fake_get", {"key": "k", "session_id": view.session_id})).envelope
        unknown = (await engine.call(BOB, "fake_get", {"key": "k", "session_id": "fake-nope"})).envelope
        assert foreign.code == unknown.code == 1003
        assert foreign.message == unknown.message
        assert view.session_id not in foreign.message
        with pytest.raises(SessionError):
            await engine.destroy_sessions(BOB, session_id=view.session_id)
        assert await engine.list_sessions(BOB, everything=True) == []


async def test_a_caller_without_a_worker_can_create_and_use_a_session_by_handle(executor):
    async with executor(manifest_of(FAKE)) as engine:
        created = (await engine.call(ALICE_NO_WORKER, "create_session", {"resource": "fake"})).envelope
        assert created.code == 0
        handle = created.data["session_id"]
        assert handle in created.text()
        await engine.call(ALICE_NO_WORKER, "fake_set", {"key": "k", "value": 1, "session_id": handle})
        got = (await engine.call(ALICE_NO_WORKER, "fake_get", {"key": "k", "session_id": handle})).envelope
        assert got.data["value"] == 1
        # without the handle, the call runs in a temporary session, and says so
        temporary = (await engine.call(ALICE_NO_WORKER, "fake_get", {"key": "k"})).envelope
        assert temporary.meta.temporary_session
        assert "temporary session" in temporary.text()
        assert "session_id" in temporary.text()


async def test_disconnect_grace_lets_a_call_by_handle_adopt_the_session(executor):
    async with executor(manifest_of(FAKE, session_ttl=30, disconnect_grace=30)) as engine:
        [(view, _)] = await engine.create_sessions(ALICE, "fake")
        await engine.call(ALICE, "fake_set", {"key": "k", "value": 3})
        await engine.disconnect(ALICE.worker_key or "")
        assert (await engine.list_sessions(ALICE_OTHER_CONNECTION, everything=True))[0].orphaned
        got = (await engine.call(ALICE_OTHER_CONNECTION, "fake_get", {"key": "k", "session_id": view.session_id}))
        assert got.envelope.data["value"] == 3
        # adopted: the new connection's calls without a handle use it too
        plain = (await engine.call(ALICE_OTHER_CONNECTION, "fake_get", {"key": "k"})).envelope
        assert plain.meta.session_id == view.session_id
        assert not (await engine.list_sessions(ALICE_OTHER_CONNECTION))[0].orphaned


async def test_sessions_of_a_disconnected_client_end_when_the_grace_ends(executor):
    async with executor(manifest_of(FAKE, session_ttl=30, disconnect_grace=0.2)) as engine:
        [(view, _)] = await engine.create_sessions(ALICE, "fake")
        await engine.disconnect(ALICE.worker_key or "")
        await eventually(lambda: _not(engine.backend_attr("fake", "live")), 10)
        gone = (await engine.call(ALICE_OTHER_CONNECTION, "fake_get", {"key": "k", "session_id": view.session_id}))
        assert gone.envelope.code == 1003


async def test_explicit_close_destroys_at_once_without_grace():
    # Local only: close_worker is the in-process Sandbox's call, not a tool.
    backend = FakeBackend()
    async with Engine({"fake": backend}, session_ttl=30, disconnect_grace=30) as engine:
        await engine.create_sessions(ALICE, "fake")
        await engine.close_worker(ALICE)
        assert not backend.live


async def test_reinitialize_ends_the_old_handle_and_returns_a_new_one(executor):
    async with executor(manifest_of(FAKE)) as engine:
        [(view, _)] = await engine.create_sessions(ALICE, "fake", {"label": "old"})
        result = (await engine.call(ALICE_OTHER_CONNECTION, "reinitialize", {"session_id": view.session_id,
                                                                            "config": {"label": "new"}})).envelope
        assert result.code == 0
        new = result.data["session_id"]
        assert new != view.session_id
        old_call = (await engine.call(ALICE, "fake_get", {"key": "k", "session_id": view.session_id})).envelope
        assert old_call.code == 1003
        # the owner's default session follows the replacement
        assert (await engine.call(ALICE, "fake_get", {"key": "k"})).envelope.data["label"] == "new"


async def test_caps_per_worker_and_per_principal_give_2004(executor):
    # On Ray fake and other live on different hosts: the caps still span both.
    manifest = manifest_of({"fake": FAKE["fake"], "other": FAKE["fake"]}, per_worker=1, per_principal=2)
    async with executor(manifest) as engine:
        await engine.create_sessions(ALICE, "fake")
        with pytest.raises(ResourceUnavailable, match="client's session limit"):
            await engine.create_sessions(ALICE, "other")
        await engine.create_sessions(ALICE_OTHER_CONNECTION, "fake")
        with pytest.raises(ResourceUnavailable, match="credentials' session limit"):
            await engine.create_sessions(Caller("alice", "w-third"), "fake")
        # another principal is unaffected
        await engine.create_sessions(BOB, "fake")


async def test_policy_may_be_tightened_never_loosened(executor):
    policy = {"fake": {"isolation": "none", "network": "none"}}
    async with executor(manifest_of(FAKE, policies=policy)) as engine:
        loosen = (await engine.call(ALICE, "create_session", {"resource": "fake", "config": {"network": "host"}}))
        assert loosen.envelope.code == 1006
        assert "network" in loosen.envelope.message
        bigger = {"resource": "fake", "config": {"limits": {"memory_mb": 999_999}}}
        assert (await engine.call(ALICE, "create_session", bigger)).envelope.code == 1006
        tighter = {"resource": "fake", "config": {"limits": {"memory_mb": 256}, "isolation": "sandbox"}}
        ok = (await engine.call(ALICE, "create_session", tighter)).envelope
        assert ok.code == 0
        assert ok.data["sessions"][0]["policy"]["limits"]["memory_mb"] == 256
        assert ok.data["sessions"][0]["policy"]["isolation"] == "sandbox"
    with pytest.raises(PermissionDenied):
        Policy(allow_file_urls=False).tightened({"allow_file_urls": True})
    assert Policy.model_validate({"isolation": "bwrap", "network": True}).network == "internet"


async def test_huge_inputs_are_never_echoed_in_full(executor):
    async with executor(manifest_of(FAKE)) as engine:
        huge = "x" * (1 << 20)
        for name, args in [
            ("create_session", {"resource": huge}),
            (huge, {}),
            ("fake_set", {"key": huge, "value": huge}),
            ("create_session", {"resource": "fake", "config": {"label": 1, huge: 1}}),
        ]:
            outcome = await engine.call(ALICE, name, args)
            assert outcome.envelope.code != 0
            assert len(json.dumps(outcome.envelope.model_dump(mode="json"))) < 20_000


async def test_results_are_capped_below_the_client_event_limit(executor):
    async with executor(manifest_of(FAKE)) as engine:
        await engine.create_sessions(ALICE, "fake")
        # control characters escape to six bytes each in JSON
        outcome = await engine.call(ALICE, "fake_huge", {"seq": 2_000_000})
        envelope = outcome.envelope
        assert envelope.code == 0
        assert envelope.data["result_truncated"] is True
        wire = json.dumps(envelope.model_dump(mode="json")) + envelope.text()
        assert len(wire.encode()) < RESULT_BUDGET


async def test_unknown_tool_is_1001_and_unknown_resource_is_1005(executor):
    async with executor(manifest_of(FAKE)) as engine:
        assert (await engine.call(ALICE, "no_such_tool", {})).envelope.code == 1001
        assert (await engine.call(ALICE, "create_session", {"resource": "nope"})).envelope.code == 1005


async def test_list_everything_shows_the_principals_sessions_only(executor):
    async with executor(manifest_of(FAKE)) as engine:
        await engine.create_sessions(ALICE, "fake")
        await engine.create_sessions(ALICE_OTHER_CONNECTION, "fake")
        await engine.create_sessions(BOB, "fake")
        assert len(await engine.list_sessions(ALICE)) == 1
        assert len(await engine.list_sessions(ALICE, everything=True)) == 2
        listed = (await engine.call(ALICE, "list_sessions", {"all": True})).envelope
        assert len(listed.data["sessions"]) == 2


async def test_a_call_by_handle_holds_the_session_against_the_ttl(executor):
    async with executor(manifest_of(FAKE, session_ttl=0.3)) as engine:
        [(view, _)] = await engine.create_sessions(ALICE_NO_WORKER, "fake")
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, ALICE_NO_WORKER, "fake_work", {"seconds": 0.8, "session_id": view.session_id})
            await eventually(lambda: _equals(engine.backend_attr("fake", "working"), 1), 5)
        # survived a call longer than the TTL
        after = await engine.call(ALICE_NO_WORKER, "fake_get", {"key": "k", "session_id": view.session_id})
        assert after.envelope.code == 0
        await eventually(lambda: _not(engine.backend_attr("fake", "live")), 10)


async def test_destroying_all_includes_sessions_adopted_beside_the_default(executor):
    async with executor(manifest_of(FAKE, session_ttl=30, disconnect_grace=30)) as engine:
        [(adoptee, _)] = await engine.create_sessions(ALICE, "fake")
        await engine.disconnect(ALICE.worker_key or "")
        await engine.create_sessions(ALICE_OTHER_CONNECTION, "fake")  # its own default
        await engine.call(ALICE_OTHER_CONNECTION, "fake_get", {"key": "k", "session_id": adoptee.session_id})
        assert len(await engine.backend_attr("fake", "live")) == 2
        destroyed = (await engine.call(ALICE_OTHER_CONNECTION, "destroy_session", {})).envelope
        assert len(destroyed.data["destroyed"]) == 2
        assert not await engine.backend_attr("fake", "live")


async def test_a_warm_pool_hands_out_ready_sessions_once_and_refills():
    # Local only: it watches the engine's pool object (on Ray each host keeps its own pool: the same code).
    backend = FakeBackend()
    async with Engine({"fake": backend}, pools={"fake": 2}, limits=Limits(per_worker=1)) as engine:
        await eventually(lambda: len(engine.warm["fake"].ready) == 2, 10)
        assert engine.list_sessions(ALICE, everything=True) == []  # pool members are nobody's
        members = set(engine.warm["fake"].describe()["members"])
        [(view, _)] = await engine.create_sessions(ALICE, "fake", {"custom_name": "mine"})
        assert view.session_name == "mine"
        assert engine.sessions[view.session_id].label in members  # a pooled one: no start on the call path
        await engine.call(ALICE, "fake_set", {"key": "k", "value": 1})
        # a temporary call takes a pooled one too, and it is destroyed with the call (never recycled)
        temporary = (await engine.call(BOB, "fake_get", {"key": "k"})).envelope
        assert temporary.meta.temporary_session
        assert temporary.data["value"] is None
        # a non-default config starts a fresh session
        [(custom, _)] = await engine.create_sessions(BOB, "fake", {"label": "custom"})
        assert (await engine.call(BOB, "fake_get", {"key": "k"})).envelope.data["label"] == "custom"
        assert custom.session_id != view.session_id
        await eventually(lambda: len(engine.warm["fake"].ready) == 2, 10)
        assert engine.status()["warm_pools"]["fake"]["taken"] == 2
    assert not backend.live  # pool members die with the engine


async def test_a_capped_caller_leaves_the_pool_member_in_the_pool():
    # Local only: it watches the engine's pool object.
    async with Engine({"fake": FakeBackend()}, pools={"fake": 1}, limits=Limits(per_principal=1)) as engine:
        await eventually(lambda: len(engine.warm["fake"].ready) == 1, 10)
        await engine.create_sessions(ALICE, "fake")
        await eventually(lambda: len(engine.warm["fake"].ready) == 1, 10)
        with pytest.raises(ResourceUnavailable):
            await engine.create_sessions(ALICE_OTHER_CONNECTION, "fake")
        assert len(engine.warm["fake"].ready) == 1


async def test_a_tier_the_host_cannot_provide_is_a_configuration_error_not_a_broken_session():
    # Local only: its backend is a class made inside the test, which a Ray host cannot import.
    from session.errors import ConfigurationError

    class NoTier(FakeBackend):
        async def initialize(self, setup):
            raise ConfigurationError("network 'internet' is not available on this host: pasta cannot filter")

    async with Engine({"fake": NoTier()}) as engine:
        refused = (await engine.call(ALICE, "create_session", {"resource": "fake"})).envelope
        assert refused.code == 5001
        assert "pasta" in refused.message
        several = (await engine.call(ALICE, "create_session", {"resource": ["fake"]})).envelope
        assert several.code == 5001
        temporary = (await engine.call(ALICE, "fake_get", {"key": "k"})).envelope
        assert temporary.code == 5001


async def test_a_disconnect_puts_adopted_sessions_in_the_grace_too(executor):
    async with executor(manifest_of(FAKE, session_ttl=30, disconnect_grace=0.2)) as engine:
        [(adoptee, _)] = await engine.create_sessions(ALICE, "fake")
        await engine.disconnect(ALICE.worker_key or "")
        await engine.create_sessions(ALICE_OTHER_CONNECTION, "fake")  # its own default
        await engine.call(ALICE_OTHER_CONNECTION, "fake_get", {"key": "k", "session_id": adoptee.session_id})
        await engine.disconnect(ALICE_OTHER_CONNECTION.worker_key or "")
        # both the default and the adopted session end with the grace, not only the default
        await eventually(lambda: _not(engine.backend_attr("fake", "live")), 10)


async def test_a_link_to_a_foreign_session_is_refused_without_echoing_the_handle(executor):
    # On Ray linked resources share a host (a link hands one session's state to another's start).
    async with executor(manifest_of({"fake": FAKE["fake"], "linked": "tests.fakes.LinkedFake"})) as engine:
        [(view, _)] = await engine.create_sessions(ALICE, "fake")
        refused = (
            await engine.call(BOB, "create_session", {"resource": "linked", "config": {"label": view.session_id}})
        ).envelope
        assert refused.code == 1002
        assert view.session_id not in refused.message
        assert view.session_id.partition("-")[2] not in refused.message
        own = {"resource": "linked", "config": {"label": view.session_id}}
        assert (await engine.call(ALICE, "create_session", own)).envelope.code == 0
