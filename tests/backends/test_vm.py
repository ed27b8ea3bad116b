"""The vm backend against real Xvfb, openbox, xterm and a small probe window.

Each test drives `VMBackend` directly (no engine, no MCP; see `vm_harness`): initialize a
session under the operator's policy (the default tier, `sandbox`, unless a test says
otherwise), call tools through the backend's registry with validated argument models,
and clean up. The probe app (`vm_probe_app.py`) logs what reaches its window.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import Xlib.XK as XK
from PIL import Image as PILImage

from backends.base import Runtime, ToolResult
from backends.vm import VMBackend
from backends.vm.display import OutputLog
from backends.vm.keys import parse_combo, split_combo
from backends.vm.models import LaunchResult, PointResult
from backends.vm.xgrab import RootGrabber
from session.errors import BackendError, ParameterError, SessionError
from tests.backends.vm_harness import (
    RUN_SERVER_ID,
    SHELL,
    Desktops,
    Session,
    alive,
    desktops,
    events,
    file_text,
    names,
    needs_desktop,
    until,
)
from tests.support.leaks import session_pids

pytestmark = [pytest.mark.slow, needs_desktop]

CONTROL_MASK = 1 << 2


@pytest.fixture
async def vm() -> AsyncIterator[Desktops]:
    async for pool in desktops():
        yield pool


async def _probe(session: Session) -> tuple[OutputLog, dict]:
    """Open the probe window; return its log and its settled geometry (screen coordinates)."""
    result = await session.call("launch", command=session.probe_command())
    assert result.window is not None, result
    log = session.last_app_log()
    await until(lambda: events(log, "geometry"), what="probe window")
    # The window manager may still move it (decorations): wait until its position is stable.
    settled = await until(lambda: _stable(log), what="probe window placement")
    return log, settled


def _stable(log: OutputLog) -> dict | None:
    geometry = events(log, "geometry")
    if len(geometry) >= 2 and geometry[-1] == geometry[-2]:
        return geometry[-1]
    return None


# -- keyboard -----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["sandbox", "none"])
async def test_typing_a_shell_command_into_xterm_runs_it(vm: Desktops, tier: str) -> None:
    session = await vm.start({"startup": [SHELL]}, tier=tier)
    await session.call("type", text="echo typed-ok > $HOME/out.txt\n")
    assert await file_text(session.home / "out.txt", "\n") == "typed-ok\n"


async def test_unicode_and_long_text_arrive_intact(vm: Desktops) -> None:
    session = await vm.start({"startup": [SHELL]})
    # More distinct non-keyboard characters than there are spare keycodes, so bindings get reused.
    exotic = "αβγδεζηθικλμνξοπρστυφχψω ÄÖÜß é€→✓ 日本語"
    long_ascii = "".join(chr(0x21 + i % 90) for i in range(1500)).replace("'", "_")
    text = f"{exotic} {long_ascii}"
    await session.call("type", text=f"printf '%s.' '{text}' > $HOME/long.txt\n")
    # ~1600 keystrokes through xterm and a shell: seconds when idle, far longer on a loaded machine.
    assert await file_text(session.home / "long.txt", ".", seconds=90) == text + "."


async def test_hotkey_and_key_reach_the_focused_app(vm: Desktops) -> None:
    session = await vm.start()
    log, _ = await _probe(session)
    await session.call("hotkey", keys=["ctrl", "l"])
    await session.call("hotkey", keys="ctrl+shift+t")
    await session.call("key", name="F5", repeat=2)
    keys = await until(lambda: len(events(log, "key")) >= 7 and events(log, "key"), what="key events")
    l_press = next(k for k in keys if k["keysym"] == "l")
    assert l_press["state"] & CONTROL_MASK
    t_press = next(k for k in keys if k["keysym"] == "t")
    assert t_press["state"] & CONTROL_MASK
    assert t_press["state"] & 1  # Shift
    assert [k["keysym"] for k in keys].count(hex(XK.string_to_keysym("F5"))) == 2


# -- mouse --------------------------------------------------------------------------------


async def test_click_delivers_its_coordinates_to_the_window(vm: Desktops) -> None:
    session = await vm.start()
    log, geo = await _probe(session)
    await session.call("click", x=geo["x"] + 10, y=geo["y"] + 20)
    await session.call("right_click", x=geo["x"] + 30, y=geo["y"] + 40)
    await session.call("double_click", x=geo["x"] + 50, y=geo["y"] + 60)
    presses = await until(lambda: len(events(log, "button")) >= 4 and events(log, "button"), what="clicks")
    got = [(p["button"], p["x"], p["y"]) for p in presses]
    assert got == [(1, 10, 20), (3, 30, 40), (1, 50, 60), (1, 50, 60)]
    assert (presses[0]["root_x"], presses[0]["root_y"]) == (geo["x"] + 10, geo["y"] + 20)


async def test_an_omitted_coordinate_keeps_the_pointer_position(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"})
    await session.call("move", x=200, y=300)
    result = await session.call("click", x=100)  # the seed's call: {"x": 100}
    assert (result.x, result.y) == (100, 300)
    assert await session.call("cursor_position") == PointResult(x=100, y=300)
    await session.call("click", y=50)
    assert await session.call("cursor_position") == PointResult(x=100, y=50)


async def test_scroll_and_drag_reach_the_app(vm: Desktops) -> None:
    session = await vm.start()
    log, geo = await _probe(session)
    cx, cy = geo["x"] + 100, geo["y"] + 100
    await session.call("scroll", x=cx, y=cy, direction="down", amount=2)
    await session.call("scroll", direction="up", amount=1)
    dragged = await session.call("drag", **{"from": [cx, cy], "to": [cx + 50, cy + 30]})
    assert dragged.model_dump(by_alias=True)["to"] == (cx + 50, cy + 30)
    presses = await until(lambda: len(events(log, "button")) >= 4 and events(log, "button"), what="wheel")
    assert [p["button"] for p in presses] == [5, 5, 4, 1]
    assert (presses[0]["x"], presses[0]["y"]) == (100, 100)
    assert await session.call("cursor_position") == PointResult(x=cx + 50, y=cy + 30)


# -- screenshots --------------------------------------------------------------------------


async def test_screenshot_size_follows_screen_size(vm: Desktops) -> None:
    session = await vm.start({"screen_size": [1920, 1080], "startup": [SHELL], "show_cursor": True})
    data, image = await session.screenshot()
    assert image.size == (1920, 1080)
    assert (data.width, data.height, data.scale) == (1920, 1080, 1.0)
    assert data.bytes < 900 * 1024
    # Shared memory reaches into the sandbox too (the memfd travels over the X socket).
    assert session.backend.describe(session.state)["screenshots"] == "mit-shm"

    # startup waits (bounded) for the window's focus; on a loaded machine it can come later
    title = await until(lambda: session.state.input.active_window_title() == "sh", what="xterm focused")
    assert title


async def test_scaled_screenshots_map_coordinates_back(vm: Desktops) -> None:
    session = await vm.start({"screen_size": [1920, 1080], "scale_to": [1280, 800]})
    data, image = await session.screenshot()
    assert image.size == (1280, 720)
    assert (data.screen_width, data.screen_height) == (1920, 1080)
    log, geo = await _probe(session)  # screen coordinates
    model_x, model_y = round((geo["x"] + 90) / 1.5), round((geo["y"] + 60) / 1.5)
    await session.call("click", x=model_x, y=model_y)
    press = (await until(lambda: events(log, "button"), what="click"))[0]
    assert abs(press["root_x"] - (geo["x"] + 90)) <= 1
    assert abs(press["root_y"] - (geo["y"] + 60)) <= 1
    with pytest.raises(ParameterError, match="1280x720"):
        await session.call("click", x=1300, y=10)


async def test_two_sessions_get_distinct_displays_and_screens(vm: Desktops) -> None:
    one = await vm.start({"startup": [SHELL]})
    two = await vm.start({"startup": [SHELL]})
    assert one.desktop.display_name != two.desktop.display_name
    two_before = await _settled_screen(two)
    await one.call("type", text="echo only-in-session-one > $HOME/one.txt\n")
    await file_text(one.home / "one.txt", "\n")
    assert not (two.home / "one.txt").exists()
    assert (await _settled_screen(two)).tobytes() == two_before.tobytes()


async def test_shared_memory_and_copied_grabs_agree(vm: Desktops) -> None:
    session = await vm.start({"startup": [SHELL]})
    await _settled_screen(session)
    shared = await anyio.to_thread.run_sync(RootGrabber, session.desktop.endpoint)
    copied = await anyio.to_thread.run_sync(lambda: RootGrabber(session.desktop.endpoint, shared_memory=False))
    try:
        assert (shared.shared_memory, copied.shared_memory) == (True, False)
        one = bytes(await anyio.to_thread.run_sync(shared.grab, 1280, 800))
        two = bytes(await anyio.to_thread.run_sync(copied.grab, 1280, 800))
        assert len(one) == 1280 * 800 * 4
        assert one == two
        assert len(set(one[0::4])) > 1  # not a blank buffer: the xterm is on it
    finally:
        shared.close()
        copied.close()


async def _settled_screen(session: Session) -> PILImage.Image:
    """A screenshot once the screen stopped changing (apps paint a while after mapping)."""
    _, last = await session.screenshot()
    with anyio.fail_after(15):
        while True:
            await anyio.sleep(0.2)
            _, now = await session.screenshot()
            if now.tobytes() == last.tobytes():
                return now
            last = now


# -- lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["sandbox", "none"])
async def test_cleanup_leaves_no_process_display_or_directory(vm: Desktops, tier: str) -> None:
    session = await vm.start({"startup": [SHELL]}, tier=tier)
    await session.call("launch", command=session.probe_command())
    await session.call("launch", command="sh -c 'setsid sleep 600 & exec env -i sleep 600'", wait_for_window=False)
    desktop = session.desktop
    socket = desktop.endpoint.socket_path
    expected = {"Xvfb", "openbox", "xterm", "sh", "python3", "sleep"}
    await until(lambda: expected <= names(desktop.pids()), what=f"session processes {expected}")
    pids = desktop.pids()
    # The run's leak accounting (cgroup membership) sees the same processes.
    assert set(session_pids(tag=session.setup.label)) <= set(pids)
    assert session_pids(tag=session.setup.label)
    await session.cleanup()
    assert not [p for p in pids if alive(p)]
    assert desktop.pids() == []
    assert session_pids(tag=session.setup.label) == []
    assert not socket.exists()
    assert desktop.number is not None
    assert desktop.number not in vm.backend.displays.live
    await session.cleanup()  # twice is harmless


async def test_a_failed_start_leaves_nothing_and_frees_its_display(vm: Desktops) -> None:
    with pytest.raises(ParameterError, match="program not found"):
        await vm.start({"startup": ["no-such-program-xyz"]})
    assert vm.backend.displays.live == frozenset()
    assert session_pids(tag_prefix="t") == []
    # The number is handed out again.
    again = await vm.start({"window_manager": "none"})
    assert vm.backend.displays.live == frozenset({again.desktop.number})


@pytest.mark.parametrize("tier", ["sandbox", "none"])
async def test_apps_get_a_minimal_environment_and_a_private_home(vm: Desktops, tier: str) -> None:
    os.environ["AGENTFLOW_VMTEST_SECRET"] = "server-only"
    try:
        session = await vm.start({"env": {"PROBE_VAR": "x1"}, "window_manager": "none"}, tier=tier)
        result = await session.call("launch", command=["sh", "-c", "env > $HOME/env.txt"], wait_for_window=False)
        assert isinstance(result, LaunchResult)
        text = await file_text(session.home / "env.txt", "\n")
    finally:
        del os.environ["AGENTFLOW_VMTEST_SECRET"]
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert env["DISPLAY"] == session.desktop.display_name
    assert env["PROBE_VAR"] == "x1"
    assert env["XDG_CONFIG_HOME"] == f"{env['HOME']}/.config"
    assert "AGENTFLOW_VMTEST_SECRET" not in env
    allowed = {
        "PATH",
        "HOME",
        "DISPLAY",
        "XAUTHORITY",
        "LANG",
        "TMPDIR",
        "PROBE_VAR",
        "PYTHONPATH",
        "PWD",
        "SHLVL",
        "_",
    }
    assert set(env) - allowed <= {k for k in env if k.startswith("XDG_")}


async def test_launch_reports_programs_that_exit_with_a_bounded_prefix(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"})
    done = await session.call("launch", command=["sh", "-c", "echo said-hi"], timeout=20)
    assert done.exit_code == 0
    assert done.output == "said-hi"
    assert done.window is None
    with pytest.raises(BackendError, match="exited with code 3: boom") as failed:
        await session.call("launch", command=["sh", "-c", "echo boom >&2; yes x | head -c 100000; exit 3"])
    assert len(failed.value.message) < 400  # at most 200 characters of the app's output
    with pytest.raises(ParameterError, match=r"could not be started|not found"):
        await session.call("launch", command="/no/such/program")


async def test_a_killed_x_server_is_a_session_error(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"})
    server = session.desktop.server
    assert server is not None
    assert await session.backend.health(session.state) is None
    xvfb = [pid for pid in session.desktop.pids() if names([pid]) == {"Xvfb"}]
    assert xvfb
    os.kill(xvfb[0], signal.SIGKILL)
    with anyio.fail_after(10):
        await server.wait()
    message = await session.backend.health(session.state)
    assert message is not None
    assert "X server" in message
    with pytest.raises(SessionError):
        await session.call("screenshot")


async def test_export_names_the_display_cookie_and_socket_dir(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"})
    exported = session.backend.export(session.state)
    number = session.desktop.number
    assert exported["display"] == f":{number}"
    assert await anyio.Path(exported["x11_socket_dir"], f"X{number}").is_socket()
    assert (await anyio.Path(exported["xauthority"]).stat()).st_size > 0
    assert Path(exported["x11_socket_dir"]).parent == session.setup.scratch


# -- bad input ----------------------------------------------------------------------------


async def test_bad_input_is_a_parameter_error_that_says_why(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"})
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
    with pytest.raises(ParameterError) as long_name:
        await session.call("launch", command="x" * 60_000)
    assert len(long_name.value.message) < 400


def _backend(**settings: object) -> VMBackend:
    return VMBackend(
        "vm", settings=settings, runtime=Runtime(scratch_root=Path("/nonexistent"), server_id=RUN_SERVER_ID)
    )


def test_config_and_settings_are_validated() -> None:
    backend = _backend()
    assert backend.session_config({"screen_size": [1920, 1080]}).screen_size == (1920, 1080)
    with pytest.raises(ParameterError, match="out of range"):
        backend.session_config({"screen_size": [10, 10]})
    with pytest.raises(ParameterError, match="screen_sise"):
        backend.session_config({"screen_sise": [800, 600]})
    with pytest.raises(ParameterError):
        backend.session_config({"window_manager": "kde"})
    with pytest.raises(ParameterError, match="DISPLAY"):
        backend.session_config({"env": {"DISPLAY": ":0"}})
    with pytest.raises(ParameterError, match="not valid"):
        backend.session_config({"env": {"A=B": "x"}})
    with pytest.raises(ParameterError, match="backend-wide"):
        backend.session_config({"xvfb": "/tmp/evil"})
    assert _backend(display_base=500).displays.first == 500


def test_tools_have_schemas_descriptions_and_result_models() -> None:
    tools = VMBackend.tools()
    expected = {"screenshot", "click", "double_click", "right_click", "move", "drag", "scroll", "type"}
    assert expected | {"hotkey", "key", "cursor_position", "launch", "wait"} == set(tools)
    assert VMBackend.kind().value == "session"
    assert VMBackend.isolation_tiers == frozenset({"none", "sandbox"})
    for spec in tools.values():
        assert len(spec.description) > 20, spec.name
        assert spec.result_model is not None, spec.name
        for prop in spec.input_schema()["properties"].values():
            assert prop.get("description"), spec.name
    assert set(tools["drag"].input_schema()["required"]) == {"from", "to"}


def test_key_names_agents_use_are_understood() -> None:
    names_ = {
        "ctrl+l": ["Control_L", "l"],
        "ctrl++": ["Control_L", "plus"],
        "alt+F4": ["Alt_L", "F4"],
        "kp_enter": ["KP_Enter"],
        "XF86AudioMute": ["XF86_AudioMute"],
        "pagedown": ["Next"],
        "Escape": ["Escape"],
    }
    for combo, expected in names_.items():
        assert parse_combo(combo) == [XK.string_to_keysym(n) for n in expected], combo
    assert parse_combo(["ctrl", "shift", "T"])[-1] == XK.string_to_keysym("t")  # case comes from shift
    assert split_combo("ctrl+shift+t") == ["ctrl", "shift", "t"]


async def test_wait_can_return_a_screenshot(vm: Desktops) -> None:
    session = await vm.start({"window_manager": "none"})
    plain = await session.call("wait", seconds=0)
    assert isinstance(plain, ToolResult)
    assert plain.images == []
    assert plain.data.screenshot is None
    shot = await session.call("wait", seconds=0, screenshot=True)
    assert shot.data.screenshot.width == 1280
    assert shot.images[0].mime_type == "image/png"
