"""The browser backend against a real sandboxed Chromium and a real HTTP server on 127.0.0.1.

Drives `BrowserBackend` directly, the way the engine does (v2 contract: `SessionSetup`,
`ToolContext`, result models): warmup, initialize, tools, cleanup, shutdown, and checks
the process table for leftovers. The test site is on loopback, which pages may reach only
because each session's policy lists it in `allow_private_hosts`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pydantic
import pytest
import pytest_asyncio

from backends.base import BackendKind, ToolResult
from backends.browser import BrowserBackend
from backends.browser.launcher import Launcher
from backends.browser.snapshot import compact
from backends.policy import Policy
from backends.processes import kill_pids, pids_with_marker
from sandbox import Sandbox
from session.errors import (
    BackendError,
    ConfigurationError,
    ExecutionTimeout,
    ParameterError,
    PermissionDenied,
    SessionError,
)
from tests.backends.browser_harness import (
    Session,
    Site,
    make_backend,
    pids_under,
    ref_of,
    scratch_root,
    session_setup,
)
from tests.backends.browser_harness import session as open_session
from tests.support.polling import eventually
from tests.support.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def site_server() -> Iterator[Site]:
    server = Site()
    yield server
    server.close()


@pytest.fixture(scope="module")
def site(site_server: Site) -> str:
    return site_server.url


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with scratch_root() as root:
        yield root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(scratch: Path) -> AsyncIterator[BrowserBackend]:
    b = make_backend(scratch / "shared")
    await b.warmup()
    yield b
    await b.shutdown()
    assert b.launcher.pids() == []


def session(b: BrowserBackend, label: str = "s1", **config: Any) -> Any:
    """A session whose policy lets pages reach 127.0.0.1 (the test site) and nothing else private."""
    return open_session(b, label, allow=["127.0.0.1"], **config)


def closed_port() -> int:
    return free_port()


# -- the happy paths ------------------------------------------------------------------


async def test_is_hybrid_and_declares_its_tools() -> None:
    tools = BrowserBackend.tools()
    assert BrowserBackend.kind() is BackendKind.HYBRID
    for name in ("navigate", "snapshot", "click", "type", "screenshot", "tabs", "evaluate", "wait_for"):
        assert tools[name].description
    assert tools["snapshot"].read_only


async def test_navigate_snapshot_and_click_by_ref(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        nav = await s("navigate", url=f"{site}/")
        assert (nav["title"], nav["status"]) == ("Home", 200)
        snap = await s("snapshot")
        assert 'heading "Welcome"' in snap["snapshot"]
        ref = ref_of(snap["snapshot"], 'link "Next page"')
        assert (await s("snapshot"))["snapshot"] == snap["snapshot"], "refs are stable while the page is"
        clicked = await s("click", ref=ref)
        assert clicked["url"] == f"{site}/next"
        assert clicked["title"] == "Next"
        back = await s("back")
        assert (back["title"], back["moved"]) == ("Home", True)
        assert (await s("forward"))["title"] == "Next"
        assert (await s("reload"))["title"] == "Next"


async def test_refs_reach_into_iframes(backend: BrowserBackend) -> None:
    page = "data:text/html,<p>outer</p><iframe srcdoc=\"<button onclick='document.body.append(7)'>inner</button>\">"
    async with session(backend) as s:
        await s("navigate", url=page)
        inner = ref_of((await s("snapshot"))["snapshot"], 'button "inner"')
        assert inner.startswith("f")
        await s("click", ref=inner)
        assert 'text: "7"' in (await s("snapshot"))["snapshot"]


async def test_type_into_a_form_submit_and_read_the_result(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/search")
        box = ref_of((await s("snapshot"))["snapshot"], "textbox")
        result = await s("type", ref=box, text="hello world", submit=True)
        assert result["title"] == "Result"
        assert "q=hello+world" in result["url"]
        text = await s("get_text")
        assert "You searched for: hello world" in text["text"]
        assert text["truncated"] is False


async def test_screenshot_size_follows_viewport(backend: BrowserBackend, site: str) -> None:
    async with session(backend, viewport=[800, 600]) as s:
        await s("navigate", url=f"{site}/long")
        shot = await s("screenshot")
        assert isinstance(shot, ToolResult)
        assert (shot.data["width"], shot.data["height"]) == (800, 600)
        assert (shot.data["url"], shot.data["title"]) == (f"{site}/long", "Long")
        assert shot.images[0].mime_type == "image/png"
        assert shot.images[0].data.startswith(b"\x89PNG")
        full = await s("screenshot", full_page=True)
        assert full.data["width"] == 800
        assert full.data["height"] >= 4000
        row = ref_of((await s("snapshot"))["snapshot"], "row 3")
        element = await s("screenshot", ref=row)
        assert element.data["height"] == 100


async def test_screenshot_stays_under_the_size_limit(site: str, scratch: Path) -> None:
    b = make_backend(scratch / "small-images", settings={"max_image_bytes": 64 * 1024})
    try:
        async with session(b, viewport=[640, 480]) as s:
            # Noise does not compress: the PNG is far above 64 KiB.
            await s("navigate", url=f"{site}/next")
            noise = (
                "() => { const c = document.createElement('canvas'); c.width = 640; c.height = 1200;"
                " const g = c.getContext('2d'); const d = g.createImageData(640, 1200);"
                " for (let i = 0; i < d.data.length; i++) d.data[i] = Math.random() * 255;"
                " g.putImageData(d, 0, 0); document.body.append(c); }"
            )
            await s("evaluate", expression=noise)
            shot = await s("screenshot", full_page=True)
            assert len(shot.images[0].data) <= 64 * 1024
            assert shot.images[0].mime_type == "image/jpeg"
            assert shot.data["note"]
    finally:
        await b.shutdown()


async def test_tabs_open_select_and_close(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/")
        link = ref_of((await s("snapshot"))["snapshot"], "Open in new tab")
        clicked = await s("click", ref=link)
        await s("wait_for", text="The next page")
        listed = await s("tabs")
        assert [t["active"] for t in listed["tabs"]] == [False, True]
        assert "new tab" in clicked.get("note", "") or listed["tabs"][1]["url"].endswith("/next")
        assert listed["title"] == "Next"
        selected = await s("tabs", action="select", index=0)
        assert selected["title"] == "Home"
        opened = await s("tabs", action="new", url=f"{site}/search")
        assert opened["title"] == "Search"
        assert len(opened["tabs"]) == 3
        closed = await s("tabs", action="close")
        assert [t["title"] for t in closed["tabs"]] == ["Home", "Next"]
        with pytest.raises(ParameterError, match="no tab 7"):
            await s("tabs", action="select", index=7)


async def test_evaluate_returns_json(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/next")
        probe = "() => ({n: 1, list: [1, 'a'], nan: NaN, title: document.title})"
        out = await s("evaluate", expression=probe)
        assert out["result"] == {"n": 1, "list": [1, "a"], "nan": None, "title": "Next"}
        assert (await s("evaluate", expression="document.querySelectorAll('p').length"))["result"] == 1
        heading = ref_of((await s("snapshot"))["snapshot"], "heading")
        assert (await s("evaluate", expression="el => el.tagName", ref=heading))["result"] == "H1"
        later = "new Promise(r => setTimeout(() => r(42), 50))"
        assert (await s("evaluate", expression=later))["result"] == 42


async def test_wait_for_text_selector_and_seconds(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/slow")
        assert (await s("wait_for", text="Finally here"))["title"] == "Slow"
        await s("wait_for", text_gone="Loading...")
        await s("wait_for", selector="#later")
        await s("wait_for", seconds=0.05)
        with pytest.raises(pydantic.ValidationError):
            await s("wait_for", text="x", seconds=1)


async def test_select_hover_press_and_scroll(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/widgets")
        snap = (await s("snapshot"))["snapshot"]
        chosen = await s("select_option", ref=ref_of(snap, "combobox"), values=["Green"])
        assert chosen["selected"] == ["g"]
        await s("hover", ref=ref_of(snap, "Hover me"))
        assert "Hovered" in (await s("snapshot"))["snapshot"]
        pressed = await s("press", ref=ref_of(snap, 'textbox "Keys"'), key="ArrowDown")
        assert pressed["title"] == "key ArrowDown"
        scrolled = await s("scroll", direction="down", amount=500)
        assert scrolled["scroll"]["y"] == 500
        assert (await s("scroll", direction="up"))["scroll"]["y"] == 0


async def test_console_keeps_messages_and_page_errors(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/console")
        await s("wait_for", seconds=0.2)
        out = await s("console")
        texts = {(m["type"], m["text"]) for m in out["messages"]}
        assert ("log", "hello from the page") in texts
        assert ("error", "something bad") in texts
        assert any(kind == "pageerror" and "uncaught kaboom" in text for kind, text in texts)
        errors = await s("console", errors_only=True, clear=True)
        assert {m["type"] for m in errors["messages"]} <= {"error", "pageerror"}
        assert (await s("console"))["messages"] == []


async def test_context_options_and_storage_state(backend: BrowserBackend, site: str) -> None:
    host = site.split("//")[1].split(":")[0]
    cookie = {"name": "sid", "value": "logged-in", "domain": host, "path": "/"}
    config: dict[str, Any] = {
        "user_agent": "AgentFlowTest/1.0",
        "locale": "de-DE",
        "timezone": "Asia/Tokyo",
        "extra_headers": {"X-Agent": "yes"},
        "storage_state": {"cookies": [cookie], "origins": []},
    }
    async with session(backend, **config) as s:
        await s("navigate", url=f"{site}/echo")
        text = (await s("get_text"))["text"]
        assert "User-Agent: AgentFlowTest/1.0" in text
        assert "X-Agent: yes" in text
        assert "sid=logged-in" in text
        probe = "() => [navigator.language, Intl.DateTimeFormat().resolvedOptions().timeZone]"
        assert (await s("evaluate", expression=probe))["result"] == ["de-DE", "Asia/Tokyo"]


async def test_downloads_land_in_a_private_dir_removed_on_cleanup(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/download")
        await s("click", ref=ref_of((await s("snapshot"))["snapshot"], "Get the file"))

        async def downloaded() -> bool:
            return bool((await s("downloads"))["downloads"])

        await eventually(downloaded, what="the download to finish")
        listed = await s("downloads")
        saved = anyio.Path(listed["downloads"][0]["path"])
        assert await saved.read_text() == "file contents\n"
        directory = anyio.Path(listed["directory"])
    assert not await directory.exists()


# -- isolation and concurrency --------------------------------------------------------


async def test_two_sessions_do_not_share_cookies_or_storage(backend: BrowserBackend, site: str) -> None:
    async with session(backend, "alice") as a, session(backend, "bob") as b:
        await a("navigate", url=f"{site}/next")
        await b("navigate", url=f"{site}/next")
        setter = "() => { document.cookie = 'who=alice'; localStorage.setItem('k', 'v'); }"
        await a("evaluate", expression=setter)
        probe = "() => [document.cookie, localStorage.getItem('k')]"
        assert (await a("evaluate", expression=probe))["result"] == ["who=alice", "v"]
        assert (await b("evaluate", expression=probe))["result"] == ["", None]
        await b("reload")
        assert (await b("evaluate", expression=probe))["result"] == ["", None]


async def test_concurrent_sessions_run_in_parallel(backend: BrowserBackend, site: str) -> None:
    async def journey(i: int) -> str:
        async with session(backend, f"worker-{i}") as s:
            await s("navigate", url=f"{site}/")
            link = ref_of((await s("snapshot"))["snapshot"], 'link "Next page"')
            return (await s("click", ref=link))["title"]

    titles: list[str] = []

    async def run(i: int) -> None:
        titles.append(await journey(i))

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(run, i)
    assert titles == ["Next"] * 6


async def test_results_stay_bounded(backend: BrowserBackend, site: str) -> None:
    """Nothing a page holds can push a result past the client's 1 MiB event limit."""
    async with session(backend) as s:
        await s("navigate", url=f"{site}/next")
        big = await s("evaluate", expression="() => 'x'.repeat(5_000_000)", max_chars=200_000)
        assert big["truncated"] is True
        assert len(big["result"]) <= 200_000
        spam = "() => { for (let i = 0; i < 400; i++) console.log(String(i).padEnd(5000, 'y')); }"
        await s("evaluate", expression=spam)
        await s("wait_for", seconds=0.2)
        logged = await s("console", limit=300)
        assert len(json.dumps(logged)) < 900 * 1024
        long_url = "data:text/html,<title>long</title>" + "z" * 90_000
        nav = await s("navigate", url=long_url, timeout_ms=10_000)  # the old millisecond name still works
        assert nav["title"] == "long"
        assert len(nav["url"]) < 3_000
        assert len(json.dumps(await s("tabs"))) < 10_000


# -- bad input ------------------------------------------------------------------------


async def test_unknown_stale_and_malformed_refs(backend: BrowserBackend, site: str) -> None:
    async with session(backend) as s:
        await s("navigate", url=f"{site}/")
        ref = ref_of((await s("snapshot"))["snapshot"], 'link "Search"')
        with pytest.raises(ParameterError, match="take a new snapshot"):
            await s("click", ref="e9999")
        await s("navigate", url=f"{site}/next")
        with pytest.raises(ParameterError, match="take a new snapshot") as caught:
            await s("click", ref=ref)
        assert caught.value.code == 1002
        with pytest.raises(ParameterError, match="not a ref"):
            await s("click", ref="button")
        with pytest.raises(pydantic.ValidationError):
            await s("click")


async def test_bad_urls_give_the_right_errors(backend: BrowserBackend, site: str) -> None:
    async with session(backend, block=["*/blocked*"]) as s:
        with pytest.raises(ParameterError, match="not a URL"):
            await s("navigate", url="not a url")
        with pytest.raises(ParameterError, match="scheme"):
            await s("navigate", url="javascript:alert(1)")
        with pytest.raises(BackendError, match="connection refused") as refused:
            await s("navigate", url=f"http://127.0.0.1:{closed_port()}/")
        assert refused.value.code == 2001
        with pytest.raises(PermissionDenied, match="file://"):
            await s("navigate", url="file:///etc/hostname")
        with pytest.raises(PermissionDenied, match="block"):
            await s("navigate", url=f"{site}/blocked-page")
        missing = await s("navigate", url=f"{site}/missing")
        assert missing["status"] == 404
        assert "404" in missing["note"]
        # A page's own script cannot reach host files either.
        await s("evaluate", expression="() => { location.href = 'file:///etc/hostname'; }")
        await s("wait_for", seconds=0.2)
        assert (await s("tabs"))["url"].startswith("http")
        assert (await s("navigate", url=site.removeprefix("http://") + "/next"))["title"] == "Next"


async def test_javascript_errors_and_timeouts(backend: BrowserBackend, site: str) -> None:
    async with session(backend, timeout=0.3) as s:
        await s("navigate", url=f"{site}/next")
        with pytest.raises(BackendError, match="boom") as thrown:
            await s("evaluate", expression="() => { throw new Error('boom'); }")
        assert thrown.value.code == 2001
        with pytest.raises(ExecutionTimeout) as timed_out:
            await s("click", selector="#does-not-exist")
        assert timed_out.value.code == 2002
        with pytest.raises(ExecutionTimeout, match="did not appear"):
            await s("wait_for", text="never shown", timeout=0.2)
        with pytest.raises(ExecutionTimeout, match="closed"):
            await s("evaluate", expression="() => { while (true) {} }", timeout=0.3)
        assert (await s("navigate", url=f"{site}/"))["title"] == "Home", "the session is usable afterwards"
        with pytest.raises(ParameterError, match="Unknown key"):
            await s("press", key="NoSuchKey")


async def test_config_is_validated(backend: BrowserBackend) -> None:
    for bad in ({"viewport": [10, 10]}, {"bogus": 1}, {"timeout": -1}):
        with pytest.raises(ParameterError) as caught:
            backend.session_config(bad)
        assert caught.value.code == 1002
    with pytest.raises(ParameterError, match="settings"):
        backend.session_config({"executable_path": "/bin/sh"})  # backend-wide only
    # The first contract's millisecond names still work, converted to seconds.
    old = backend.session_config({"timeout_ms": 300, "navigation_timeout_ms": 4000})
    assert (old.timeout, old.navigation_timeout) == (0.3, 4.0)
    with pytest.raises(ParameterError, match="display"):
        async with session(backend, headless=False):
            pass
    for display in (":0", "localhost:0", "sid-of-someone-else"):
        with pytest.raises(PermissionDenied, match="vm sessions") as denied:
            async with session(backend, headless=False, display=display):
                pass
        assert denied.value.code == 1006


async def test_without_root_the_proxy_alone_enforces_the_policy(
    site_server: Site, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback when the server cannot switch uids: Chromium shares the host's network, and
    the egress proxy (on the host's loopback) is what keeps pages off private addresses.

    Simulated as root by taking away Chromium's own network namespace only: it still runs as
    its unprivileged uid with its own sandbox on (it never runs as root with `--no-sandbox`)."""
    monkeypatch.setattr(Launcher, "own_network", property(lambda self: False))
    forbidden = Site()
    b = make_backend(scratch / "no-root")
    try:
        assert not b.launcher.own_network
        async with open_session(b, allow=[site_server.allow]) as s:
            assert (await s("navigate", url=f"{site_server.url}/next"))["title"] == "Next"
            with pytest.raises(PermissionDenied):
                await s("navigate", url=f"{forbidden.url}/next")
            assert s.state.handle.proxy_server.startswith("http://127.0.0.1:")
        assert b.status()["chromium_sandbox"] is True
    finally:
        await b.shutdown()
        forbidden.close()
    assert forbidden.hits == []


async def test_settings_are_backend_wide_and_checked(scratch: Path) -> None:
    moved = make_backend(scratch / "moved", settings={"launch_timeout_ms": 5000, "max_image_bytes": 1 << 20})
    assert moved.settings.launch_timeout == 5.0
    assert moved.settings.max_image_bytes == 640 * 1024, "an old 1 MiB setting is held to what fits a message"
    legacy = BrowserBackend(
        "browser",
        defaults={"executable_path": "/usr/bin/chromium", "viewport": [640, 480]},
        runtime=moved.runtime,
    )
    assert legacy.settings.executable_path == "/usr/bin/chromium"
    assert legacy.session_config().viewport == (640, 480)
    for flag in ("--no-sandbox", "--proxy-server=http://evil:1", "--remote-debugging-port=9222"):
        with pytest.raises(pydantic.ValidationError, match="not allowed"):
            make_backend(scratch / "flags", settings={"launch_args": [flag]})


# -- crashes and leaks ----------------------------------------------------------------


async def test_killed_browser_is_relaunched_and_old_sessions_fail_cleanly(site: str, scratch: Path) -> None:
    b = make_backend(scratch / "killed")
    await b.warmup()
    setup = session_setup(b, "old", allow=["127.0.0.1"])
    old = Session(b, setup, await b.initialize(setup))
    await old("navigate", url=f"{site}/next")
    first = b.launcher.pids()
    assert len(first) > 1, "the browser and its zygotes/renderers are all found"
    kill_pids(first)

    async def unhealthy() -> bool:
        # The context's own close event can come first ("closed unexpectedly"); the browser's
        # death is noticed a moment later, and that is what this test is about.
        return "stopped" in (await b.health(old.state) or "")

    await eventually(unhealthy, what="the dead browser to be noticed")
    assert "reinitialize" in (await b.health(old.state) or "").lower()
    with pytest.raises(SessionError, match="stopped") as caught:
        await old("snapshot")
    assert caught.value.code == 1003

    async with session(b, "new") as new:  # the next session relaunches the browser
        assert (await new("navigate", url=f"{site}/next"))["title"] == "Next"
        assert not set(first) & set(b.launcher.pids())
    await old.close()
    await b.shutdown()
    assert b.launcher.pids() == []
    assert all(pids_with_marker(tag) == [] for tag in b.launcher.tags)
    assert pids_under(b.runtime.scratch_root) == []


async def test_cleanup_closes_pages_and_shutdown_leaves_no_process(site: str, scratch: Path) -> None:
    b = make_backend(scratch / "cleanup")
    async with session(b) as s:  # no warmup: the first session launches the browser
        await s("tabs", action="new", url=f"{site}/next")
        context = s.state.context
    assert context.pages == []
    assert s.state.closed
    await s.close()  # twice is harmless
    assert b.launcher.pids(), "the shared browser outlives its sessions"
    await b.shutdown()
    assert b.launcher.pids() == []
    assert b.launcher.live_driver_pids() == []
    assert pids_under(b.runtime.scratch_root) == []


def wildcard_cookie_file(path: Path) -> bytes:
    """An X authority file with one MIT-MAGIC-COOKIE-1 entry for any host and display (as the vm writes)."""
    cookie = os.urandom(16)

    def field(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    path.write_bytes(struct.pack(">H", 0xFFFF) + field(b"") + field(b"") + field(b"MIT-MAGIC-COOKIE-1") + field(cookie))
    path.chmod(0o600)
    return cookie


async def start_xvfb(authority: Path) -> tuple[anyio.abc.Process, str]:
    read, write = os.pipe()
    xvfb = await anyio.open_process(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-auth", str(authority)],
        pass_fds=[write],
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    number = b""
    while not number.endswith(b"\n"):
        chunk = await anyio.to_thread.run_sync(os.read, read, 16)
        assert chunk, "Xvfb did not start"
        number += chunk
    os.close(read)
    return xvfb, f":{number.decode().strip()}"


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb not installed")
async def test_headed_context_on_a_linked_vm_display(site: str, scratch: Path) -> None:
    authority = scratch / "vm-authority"
    wildcard_cookie_file(authority)  # the desktop accepts only clients holding this cookie
    xvfb, display = await start_xvfb(authority)
    b = make_backend(scratch / "headed")
    # What the engine hands over for `display`: the linked vm session's export.
    link = {"display": display, "x11_socket_dir": "/tmp/.X11-unix", "xauthority": str(authority)}
    try:
        async with open_session(
            b, allow=["127.0.0.1"], headless=False, display="sid-of-my-vm", links={"display": link}, viewport=[640, 480]
        ) as s:
            shot = await s("screenshot")
            assert (shot.data["width"], shot.data["height"]) == (640, 480)
            assert (await s("navigate", url=f"{site}/next"))["title"] == "Next"
            headed = s.state.handle
            assert headed.display is not None
            assert headed.display.display == display
            assert headed.plan is not None
            # Only that one display's socket is in the sandbox, not the whole socket directory.
            assert headed.plan.x11_socket_dir is not None
            assert [p.name for p in headed.plan.x11_socket_dir.iterdir()] == [f"X{display[1:]}"]
        assert b.launcher.pids_of(headed.tag) == [], "a headed browser closes with its last context"
    finally:
        await b.shutdown()
        xvfb.terminate()
        await xvfb.aclose()  # reaps it and closes its pipes while this event loop still runs


# -- pure functions -------------------------------------------------------------------


async def test_compact_lifts_children_of_anonymous_wrappers() -> None:
    raw = """- generic [active] [ref=e1]:
  - generic [ref=e2]:
    - button "Hi" [ref=e3]
    - generic [ref=e7] [cursor=pointer]: clicky
  - paragraph [ref=e9]: Some text"""
    assert (
        compact(raw)
        == """- button "Hi" [ref=e3]
- generic [ref=e7] [cursor=pointer]: clicky
- paragraph [ref=e9]: Some text"""
    )


# -- through the engine ---------------------------------------------------------------


async def test_through_the_engine_policy_is_the_operators(tmp_path: Path, site_server: Site) -> None:
    """The whole stack: the manifest's policy reaches the proxy; a client cannot loosen it."""
    path = tmp_path / "manifest.json"
    path.write_text(
        json.dumps(
            {
                "server": {"session_ttl": 300, "log_level": "WARNING"},
                "resources": {"browser": {"policy": {"allow_private_hosts": [site_server.allow]}}},
            }
        )
    )
    async with Sandbox(manifest=path) as sandbox:
        await sandbox.create_session("browser", {"timeout_ms": 3000})  # the old name still works
        nav = await sandbox.execute("browser:navigate", {"url": f"{site_server.url}/next"})
        assert (nav["code"], nav["data"]["title"]) == (0, "Next"), nav
        other = closed_port()
        refused = await sandbox.execute("browser:navigate", {"url": f"http://127.0.0.1:{other}/mcp"})
        assert refused["code"] == 1006, refused
        await sandbox.destroy_session("browser")
        with pytest.raises(PermissionDenied, match="allow_file_urls"):
            await sandbox.create_session("browser", {"allow_file_urls": True})


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb not installed")
async def test_through_the_engine_a_headed_browser_shows_on_my_vm_desktop(tmp_path: Path) -> None:
    """`display` names my vm session: the engine links it, the browser window appears on that desktop."""
    path = tmp_path / "manifest.json"
    path.write_text(
        json.dumps({"server": {"session_ttl": 300, "log_level": "WARNING"}, "resources": {"vm": {}, "browser": {}}})
    )
    async with Sandbox(manifest=path) as sandbox:
        vm = await sandbox.create_session("vm")
        with pytest.raises(ParameterError, match="vm"):
            await sandbox.create_session("browser", {"headless": False, "display": ":0"})
        await sandbox.create_session("browser", {"headless": False, "display": vm["session_id"]})
        page = "data:text/html,<title>on the desktop</title><h1>HELLO</h1>"
        assert (await sandbox.execute("browser:navigate", {"url": page}))["data"]["title"] == "on the desktop"

        async def window_title() -> str:
            shot = await sandbox.execute("vm:screenshot", {})
            return str((shot.get("data") or {}).get("active_window") or "")

        await eventually(
            lambda: _contains(window_title(), "on the desktop"), what="the browser window on the vm desktop"
        )


async def _contains(title: Awaitable[str], needle: str) -> bool:
    return needle in await title


async def test_chromium_never_runs_as_root_without_its_sandbox(scratch: Path) -> None:
    """Unconfined as root, Chromium could only run with `--no-sandbox`: refused at start (5001)."""
    if os.geteuid() != 0:
        pytest.skip("only a root server could run Chromium as root")
    with pytest.raises(ConfigurationError, match="needs a server that does not run as root") as refused:
        make_backend(scratch / "unconfined", policy=Policy(isolation="none"))
    assert refused.value.code == 5001
