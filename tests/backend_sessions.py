"""Drive one backend session directly (no engine): the setup the engine would give it."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

from backends.base import Backend, SessionSetup, ToolContext
from backends.policy import Policy


@asynccontextmanager
async def backend_session(
    backend: Backend[Any, Any], config: Mapping[str, Any] | None = None, *, policy: Policy | None = None
) -> AsyncIterator[ToolContext[Any, Any]]:
    """Initialize a session of `backend` as the engine would; clean it up and remove its scratch dir."""
    label = f"{backend.name}-{secrets.token_hex(5)}"
    scratch = backend.runtime.scratch_root / label
    scratch.mkdir(mode=0o700, parents=True)
    setup = SessionSetup(
        worker_id="test",
        session_id=f"{backend.name}-{secrets.token_urlsafe(16)}",
        label=label,
        resource=backend.name,
        config=backend.session_config(config),
        policy=policy if policy is not None else backend.policy,
        scratch=scratch,
    )
    try:
        state = await backend.initialize(setup)
        try:
            yield ToolContext(config=setup.config, state=state, session=setup)
        finally:
            with anyio.CancelScope(shield=True):
                await backend.cleanup(setup, state)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
