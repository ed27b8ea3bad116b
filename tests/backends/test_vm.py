"""The vm backend against real Xvfb, openbox, xterm and a small probe window.

Each test drives `VMBackend` directly (no engine, no MCP): initialize a session,
call tools through the backend's tool registry with validated argument models, and
clean up. The probe app (`vm_probe_app.py`) logs what reaches its window.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import Xlib.XK as XK
from PIL import Image as PILImage
from pydantic import ValidationError

from backends.base import ToolContext, ToolResult
from backends.processes import pids_with_marker
from backends.vm import VMBackend, VMState
from backends.vm.display import XvfbDesktop
from backends.vm.keys import parse_combo, split_combo
from session.errors import BackendError, ParameterError, SessionError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(p) for p in ("Xvfb", "openbox", "xterm")),
        reason="needs apt packages xvfb openbox xterm",
    ),
]

PROBE = Path(__file__).with_name("vm_probe_app.py")
CONTROL_MASK = 1 << 2
SHELL = ["xterm", "-e", "/bin/sh"]


@dataclass
class Session:
    backend: VMBackend
    state: VMState
    ctx: ToolContext[VMState]

    async def call(self, tool: str, **params: Any) -> Any:
        """Call a tool the way the engine does: look it up, validate params, run it."""
        spec = self.backend.tools()[tool]
        return await spec.invoke(self.backend, self.ctx, spec.args_model.model_validate(params))

    async def screenshot(self) -> tuple[dict[str, Any], PILImage.Image]:
        result = await self.call("screenshot")
        assert isinstance(result, ToolResult)
        assert isinstance(result.data, dict)
        image = PILImage.open(io.BytesIO(result.images[0].data))
        image.load()
        return result.data, image

    @property
    def desktop(self) -> XvfbDesktop:
        assert isinstance(self.state.desktop, XvfbDesktop)
        return self.state.desktop


SessionFactory = Callable[..., Awaitable[Session]]


@pytest.fixture
async def vm() -> AsyncIterator[SessionFactory]:
    """Start sessions on demand (`await vm(config, worker=...)`); all are cleaned up afterwards."""
    backend = VMBackend("vm", {})
    sessions: list[Session] = []

    async def start(config: dict[str, Any] | None = None, worker: str = "w1") -> Session:
        cfg = backend.session_config(config or {})
        with anyio.fail_after(30):
            state = await backend.initialize(worker, cfg)
        session_id = f"s{len(sessions)}"
        ctx = ToolContext(worker_id=worker, session_id=session_id, state=state, config=cfg)
        session = Session(backend, state, ctx)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        await backend.cleanup(session.ctx.worker_id, _info(session))


def _info(session: Session) -> Any:
    return SimpleNamespace(
        session_id=session.ctx.session_id,
        worker_id=session.ctx.worker_id,
        resource_type="vm",
        state=session.state,
        config=session.ctx.config,
    )


async def _until(check: Callable[[], Any], seconds: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy."""
    try:
        with anyio.fail_after(seconds):
            while True:
                value = check()
                if value:
                    return value
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _events(log: Path, kind: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r["event"] == kind]


async def _probe(session: Session, log: Path) -> dict[str, Any]:
    """Open the probe window; return its last known geometry (screen coordinates)."""
    result = await session.call("launch", command=[sys.executable, str(PROBE), str(log)])
    assert result["window"] is not None, result
    await _until(lambda: _events(log, "geometry"), what="probe window")
    await anyio.sleep(0.2)  # let the window manager finish placing it
    return _events(log, "geometry")[-1]


async def _file_text(path: Path, seconds: float = 10.0) -> str:
    await _until(lambda: path.exists() and path.stat().st_size > 0, seconds, what=str(path))
    await anyio.sleep(0.1)
    return await anyio.Path(path).read_text()


# -- keyboard -----------------------------------------------------------------------------


async def test_typing_a_shell_command_into_xterm_runs_it(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm({"startup": [SHELL]})
    out = tmp_path / "out.txt"
    await session.call("type", text=f"echo typed-ok > {out}\n")
    assert (await _file_text(out)).strip() == "typed-ok"


async def test_unicode_and_long_text_arrive_intact(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm({"startup": [SHELL]})
    # More distinct non-keyboard characters than there are spare keycodes, so bindings get reused.
    exotic = "αβγδεζηθικλμνξοπρστυφχψω ÄÖÜß é€→✓ 日本語"
    long_ascii = "".join(chr(0x21 + i % 90) for i in range(1500)).replace("'", "_")
    text = f"{exotic} {long_ascii}"
    out = tmp_path / "long.txt"
    await session.call("type", text=f"printf '%s' '{text}' > {out}\n")
    # ~1600 keystrokes through xterm and a shell: seconds when idle, far longer on a loaded machine.
    # Poll for the whole text with a generous deadline rather than the first bytes plus a sleep.
    try:
        await _until(lambda: out.exists() and out.read_text(errors="replace") == text, 120.0, what=str(out))
    except AssertionError:
        assert (out.read_text(errors="replace") if out.exists() else None) == text
        raise


async def test_hotkey_and_key_reach_the_focused_app(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm()
    log = tmp_path / "probe.jsonl"
    await _probe(session, log)
    await session.call("hotkey", keys=["ctrl", "l"])
    await session.call("hotkey", keys="ctrl+shift+t")
    await session.call("key", name="F5", repeat=2)
    keys = await _until(lambda: len(_events(log, "key")) >= 7 and _events(log, "key"), what="key events")
    l_press = next(k for k in keys if k["keysym"] == "l")
    assert l_press["state"] & CONTROL_MASK
    t_press = next(k for k in keys if k["keysym"] == "t")
    assert t_press["state"] & CONTROL_MASK
    assert t_press["state"] & 1  # Shift
    assert [k["keysym"] for k in keys].count(hex(XK.string_to_keysym("F5"))) == 2


# -- mouse --------------------------------------------------------------------------------


async def test_click_delivers_its_coordinates_to_the_window(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm()
    log = tmp_path / "probe.jsonl"
    geo = await _probe(session, log)
    await session.call("click", x=geo["x"] + 10, y=geo["y"] + 20)
    await session.call("right_click", x=geo["x"] + 30, y=geo["y"] + 40)
    await session.call("double_click", x=geo["x"] + 50, y=geo["y"] + 60)
    presses = await _until(lambda: len(_events(log, "button")) >= 4 and _events(log, "button"), what="clicks")
    got = [(p["button"], p["x"], p["y"]) for p in presses]
    assert got == [(1, 10, 20), (3, 30, 40), (1, 50, 60), (1, 50, 60)]
    assert (presses[0]["root_x"], presses[0]["root_y"]) == (geo["x"] + 10, geo["y"] + 20)


async def test_an_omitted_coordinate_keeps_the_pointer_position(vm: SessionFactory) -> None:
    session = await vm()
    await session.call("move", x=200, y=300)
    result = await session.call("click", x=100)  # the seed's call: {"x": 100}
    assert (result["x"], result["y"]) == (100, 300)
    assert await session.call("cursor_position") == {"x": 100, "y": 300}
    await session.call("click", y=50)
    assert await session.call("cursor_position") == {"x": 100, "y": 50}


async def test_scroll_and_drag_reach_the_app(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm()
    log = tmp_path / "probe.jsonl"
    geo = await _probe(session, log)
    cx, cy = geo["x"] + 100, geo["y"] + 100
    await session.call("scroll", x=cx, y=cy, direction="down", amount=2)
    await session.call("scroll", direction="up", amount=1)
    await session.call("drag", **{"from": [cx, cy], "to": [cx + 50, cy + 30]})
    presses = await _until(lambda: len(_events(log, "button")) >= 4 and _events(log, "button"), what="wheel")
    assert [p["button"] for p in presses] == [5, 5, 4, 1]
    assert (presses[0]["x"], presses[0]["y"]) == (100, 100)
    assert await session.call("cursor_position") == {"x": cx + 50, "y": cy + 30}


# -- screenshots --------------------------------------------------------------------------


async def test_screenshot_size_follows_screen_size(vm: SessionFactory) -> None:
    session = await vm({"screen_size": [1920, 1080], "startup": [SHELL]})
    data, image = await session.screenshot()
    assert image.size == (1920, 1080)
    assert (data["width"], data["height"], data["scale"]) == (1920, 1080, 1.0)
    assert data["bytes"] < 1 << 20
    # startup waits (bounded) for the window's focus; on a loaded machine it can come later
    for _ in range(100):
        if data["active_window"] == "sh":
            break
        await anyio.sleep(0.1)
        data, _ = await session.screenshot()
    assert data["active_window"] == "sh"


async def test_scaled_screenshots_map_coordinates_back(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm({"screen_size": [1920, 1080], "scale_to": [1280, 800]})
    data, image = await session.screenshot()
    assert image.size == (1280, 720)
    assert (data["screen_width"], data["screen_height"]) == (1920, 1080)
    log = tmp_path / "probe.jsonl"
    geo = await _probe(session, log)  # screen coordinates
    model_x, model_y = round((geo["x"] + 90) / 1.5), round((geo["y"] + 60) / 1.5)
    await session.call("click", x=model_x, y=model_y)
    press = (await _until(lambda: _events(log, "button"), what="click"))[0]
    assert abs(press["root_x"] - (geo["x"] + 90)) <= 1
    assert abs(press["root_y"] - (geo["y"] + 60)) <= 1
    with pytest.raises(ParameterError, match="1280x720"):
        await session.call("click", x=1300, y=10)


async def test_two_sessions_are_isolated(vm: SessionFactory) -> None:
    one = await vm({"startup": [SHELL]}, worker="w1")
    two = await vm({"startup": [SHELL]}, worker="w2")
    assert one.desktop.display_name != two.desktop.display_name
    one_before = await _settled_screen(one)
    two_before = await _settled_screen(two)
    await one.call("type", text="echo only-in-session-one " * 6)
    await anyio.sleep(0.3)
    _, one_after = await one.screenshot()
    _, two_after = await two.screenshot()
    assert one_after.tobytes() != one_before.tobytes()
    assert two_after.tobytes() == two_before.tobytes()


async def _settled_screen(session: Session) -> PILImage.Image:
    """A screenshot once the screen stopped changing (apps paint a while after mapping)."""
    _, last = await session.screenshot()
    for _ in range(50):
        await anyio.sleep(0.2)
        _, now = await session.screenshot()
        if now.tobytes() == last.tobytes():
            return now
        last = now
    raise AssertionError("the screen never settled")


# -- lifecycle ----------------------------------------------------------------------------


async def test_cleanup_leaves_no_process_display_or_directory(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm({"startup": [SHELL]})
    await session.call("launch", command=[sys.executable, str(PROBE), str(tmp_path / "p.jsonl")])
    await session.call("launch", command="sh -c 'setsid sleep 600 &'", wait_for_window=False)
    desktop = session.desktop
    tag, display = desktop.owner.tag, desktop.display_number
    expected = {"Xvfb", "openbox", "xterm", "sh", "python", "sleep"}
    await _until(lambda: expected <= _names(desktop.pids()), what=f"session processes {expected}")
    pids = desktop.pids()
    await session.backend.cleanup("w1", _info(session))
    assert pids_with_marker(tag) == []
    assert not [p for p in pids if _alive(p)]
    assert not await anyio.Path(desktop.scratch).exists()
    assert not await anyio.Path(f"/tmp/.X11-unix/X{display}").exists()
    await session.backend.cleanup("w1", _info(session))  # twice is harmless


def _names(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            continue
    return names


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_apps_get_a_private_home(vm: SessionFactory, tmp_path: Path) -> None:
    session = await vm({"env": {"PROBE_VAR": "x1"}})
    out = tmp_path / "env.txt"
    cmd = f"echo $HOME $XDG_CONFIG_HOME $DISPLAY $PROBE_VAR > {out}"
    await session.call("launch", command=["sh", "-c", cmd], wait_for_window=False)
    home, config_home, display, var = (await _file_text(out)).split()
    assert home.startswith(str(session.desktop.scratch))
    assert config_home == f"{home}/.config"
    assert display == session.desktop.display_name
    assert var == "x1"


async def test_launch_reports_programs_that_exit(vm: SessionFactory) -> None:
    session = await vm({"window_manager": "none"})
    done = await session.call("launch", command=["sh", "-c", "echo said-hi"], timeout=20)
    assert done["exit_code"] == 0
    assert done["output"] == "said-hi"
    assert done["window"] is None
    with pytest.raises(BackendError, match="exited with code 3: boom"):
        await session.call("launch", command=["sh", "-c", "echo boom >&2; exit 3"])


async def test_a_killed_x_server_is_a_session_error(vm: SessionFactory) -> None:
    session = await vm({"window_manager": "none"})
    server = session.desktop.server
    assert server is not None
    assert await session.backend.health(session.state) is None
    os.kill(server.pid, signal.SIGKILL)
    with anyio.fail_after(5):
        await server.wait()
    message = await session.backend.health(session.state)
    assert message is not None
    assert "X server" in message
    with pytest.raises(SessionError):
        await session.call("screenshot")


# -- bad input ----------------------------------------------------------------------------


async def test_bad_input_is_a_parameter_error_that_says_why(vm: SessionFactory) -> None:
    session = await vm({"window_manager": "none"})
    with pytest.raises(ParameterError, match=r"1280x800") as off_screen:
        await session.call("click", x=1280, y=10)
    assert off_screen.value.code == 1002
    with pytest.raises(ParameterError, match=r"outside the screen"):
        await session.call("move", x=-1, y=10)
    with pytest.raises(ParameterError, match=r"unknown key name 'ctlr'.*'ctrl'"):
        await session.call("hotkey", keys=["ctlr", "c"])
    with pytest.raises(ParameterError, match="unknown key name"):
        await session.call("key", name="NoSuchKey")
    with pytest.raises(ParameterError, match="text is empty"):
        await session.call("type", text="")
    with pytest.raises(ParameterError, match="control character"):
        await session.call("type", text="a\x1bb")
    with pytest.raises(ParameterError, match="program not found"):
        await session.call("launch", command="no-such-program-xyz")
    with pytest.raises(ParameterError, match="command is empty"):
        await session.call("launch", command="")


def test_config_is_validated() -> None:
    backend = VMBackend("vm", {})
    assert backend.session_config({"screen_size": [1920, 1080]}).screen_size == (1920, 1080)  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="out of range"):
        backend.session_config({"screen_size": [10, 10]})
    with pytest.raises(ValidationError, match="screen_sise"):
        backend.session_config({"screen_sise": [800, 600]})
    with pytest.raises(ValidationError):
        backend.session_config({"window_manager": "kde"})


def test_tools_have_schemas_and_descriptions() -> None:
    tools = VMBackend.tools()
    expected = {"screenshot", "click", "double_click", "right_click", "move", "drag", "scroll", "type"}
    assert expected | {"hotkey", "key", "cursor_position", "launch", "wait"} == set(tools)
    assert VMBackend.kind().value == "session"
    for spec in tools.values():
        assert len(spec.description) > 20, spec.name
        for prop in spec.input_schema()["properties"].values():
            assert prop.get("description"), spec.name
    assert set(tools["drag"].input_schema()["required"]) == {"from", "to"}


def test_key_names_agents_use_are_understood() -> None:
    names = {
        "ctrl+l": ["Control_L", "l"],
        "ctrl++": ["Control_L", "plus"],
        "alt+F4": ["Alt_L", "F4"],
        "kp_enter": ["KP_Enter"],
        "XF86AudioMute": ["XF86_AudioMute"],
        "pagedown": ["Next"],
        "Escape": ["Escape"],
    }
    for combo, expected in names.items():
        assert parse_combo(combo) == [XK.string_to_keysym(n) for n in expected], combo
    assert parse_combo(["ctrl", "shift", "T"])[-1] == XK.string_to_keysym("t")  # case comes from shift
    assert split_combo("ctrl+shift+t") == ["ctrl", "shift", "t"]
