"""Shared by the vm tests: a `VMBackend` driven directly (no engine, no MCP), like the engine drives it.

Every backend these tests make carries this run's server id (`<run id>-<pid>-<hex>`) and a
scratch root of its own (0700, as the engine makes it), so leak checks count only this run's
processes and files. Sessions get the operator's policy the test names; a read-only mount
of this checkout lets the probe app (`vm_probe_app.py`, python-xlib from this checkout's
venv) run inside a sandbox.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import Xlib
from PIL import Image as PILImage

from backends.base import Runtime, SessionSetup, ToolContext, ToolResult
from backends.policy import Limits, Mount, Policy
from backends.sandbox import mechanisms
from backends.vm import VMBackend, VMState
from backends.vm.display import OutputLog, XvfbDesktop
from backends.vm.models import Config
from tests.support import procs
from tests.support.leaks import run_id
from tests.support.polling import eventually

#: This run's server id (`<run id>-<pid>-<hex>`): the run's leak accounting recognises its cgroups.
RUN_SERVER_ID = f"{run_id()}-{os.getpid()}-{secrets.token_hex(4)}"
REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vm_probe_app.py")
#: The probe's interpreter inside a sandbox: the system Python with this checkout's python-xlib.
SYSTEM_PYTHON = "/usr/bin/python3"
SITE_PACKAGES = Path(Xlib.__file__).resolve().parents[1]
SHELL = ["xterm", "-e", "/bin/sh"]

needs_desktop = pytest.mark.skipif(
    not all(shutil.which(p) for p in ("Xvfb", "openbox", "xterm")), reason="needs apt packages xvfb openbox xterm"
)


def require_tier(tier: str) -> None:
    """Skip (with the host's reason) when this machine cannot provide `tier`."""
    state = mechanisms()["tiers"][tier]
    if state != "available":
        pytest.skip(f"isolation {tier!r} {state}")


def policy(tier: str, **limits: int) -> Policy:
    """The operator's policy for test desktops: the tier, plus this checkout read-only (for the probe)."""
    return Policy(isolation=tier, mounts=[Mount(host=str(REPO), mode="ro")], limits=Limits(**limits))


@dataclass
class Session:
    backend: VMBackend
    setup: SessionSetup[Config]
    state: VMState
    ctx: ToolContext[Config, VMState]

    async def call(self, tool: str, **params: Any) -> Any:
        """Call a tool the way the engine does: look it up, validate params, run it."""
        spec = self.backend.tools()[tool]
        if not spec.takes_args:
            return await spec.handler(self.backend, self.ctx)
        return await spec.handler(self.backend, self.ctx, spec.args_model.model_validate(params))

    async def screenshot(self) -> tuple[Any, PILImage.Image]:
        result = await self.call("screenshot")
        assert isinstance(result, ToolResult)
        image = PILImage.open(io.BytesIO(result.images[0].data))
        image.load()
        return result.data, image

    @property
    def desktop(self) -> XvfbDesktop:
        assert isinstance(self.state.desktop, XvfbDesktop)
        return self.state.desktop

    @property
    def home(self) -> Path:
        """The session's home as the server sees it."""
        return self.setup.scratch / "home"

    def probe_command(self) -> list[str]:
        """Start the probe window, logging to its standard output (captured by the desktop)."""
        return [SYSTEM_PYTHON, str(PROBE), "-"]

    def last_app_log(self) -> OutputLog:
        return self.desktop.apps[-1].log

    async def cleanup(self) -> None:
        await self.backend.cleanup(self.setup, self.state)


@dataclass
class Desktops:
    """Starts sessions on one backend; `close` cleans up every one of them."""

    backend: VMBackend
    root: Path
    sessions: list[Session] = field(default_factory=list)
    started: int = 0

    async def start(self, config: dict[str, Any] | None = None, *, tier: str = "sandbox", **limits: int) -> Session:
        require_tier(tier)
        self.started += 1
        label = f"t{self.started}"
        scratch = self.root / label
        scratch.mkdir(mode=0o700)
        # The engine would do the same; the probe finds python-xlib through it.
        cfg = self.backend.session_config({"env": {"PYTHONPATH": str(SITE_PACKAGES)}, **(config or {})})
        assert isinstance(cfg, Config)
        setup = SessionSetup(
            worker_id="w",
            session_id=secrets.token_hex(8),
            label=label,
            resource="vm",
            config=cfg,
            policy=policy(tier, **limits),
            scratch=scratch,
        )
        with anyio.fail_after(60):
            state = await self.backend.initialize(setup)
        session = Session(self.backend, setup, state, ToolContext(config=cfg, state=state, session=setup))
        self.sessions.append(session)
        return session

    async def close(self) -> None:
        for session in self.sessions:
            await session.cleanup()


async def desktops(settings: dict[str, Any] | None = None) -> AsyncIterator[Desktops]:
    """A backend with its own scratch root, `agentflow-<server id>` like the engine's."""
    root = Path(tempfile.mkdtemp(prefix=f"agentflow-{RUN_SERVER_ID}-"))
    backend = VMBackend("vm", settings=settings, runtime=Runtime(scratch_root=root, server_id=RUN_SERVER_ID))
    pool = Desktops(backend, root)
    try:
        yield pool
    finally:
        await pool.close()
        shutil.rmtree(root, ignore_errors=True)


async def until(check: Callable[[], Any], seconds: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (no event exists for another process's output)."""
    return await eventually(check, seconds, what=what)


def events(log: OutputLog, kind: str) -> list[dict[str, Any]]:
    """The probe's records of one kind (complete lines only)."""
    text = log.read(1 << 20).decode()
    records = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n") and line.strip()]
    return [r for r in records if r["event"] == kind]


async def file_text(path: Path, expected_end: str = "", seconds: float = 60.0) -> str:
    """A file's text once it exists, is non-empty and ends as expected."""

    def ready() -> str | None:
        try:
            text = path.read_text()
        except OSError:
            return None
        return text if text and text.endswith(expected_end) else None

    result: str = await until(ready, seconds, what=str(path))
    return result


def names(pids: list[int]) -> set[str]:
    return {name for name in map(procs.name, pids) if name}


alive = procs.alive
