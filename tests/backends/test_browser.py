"""The browser backend against a real Chromium and a real HTTP server on 127.0.0.1.

Drives `BrowserBackend` directly (no MCP layer): warmup, initialize, tools, cleanup,
shutdown, and checks the process table for leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import anyio
import pydantic
import pytest
import pytest_asyncio

from backends.base import BackendKind, ToolContext, ToolResult
from backends.browser import BrowserBackend
from backends.browser.session import BrowserSession
from backends.browser.snapshot import compact
from backends.processes import kill_pids, pids_with_marker
from session.errors import (
    BackendError,
    ExecutionTimeout,
    ParameterError,
    PermissionDenied,
    SessionError,
)
from tests.support.polling import eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PAGES: dict[str, str] = {
    "/": """<title>Home</title><h1>Welcome</h1>
        <a href="/next">Next page</a> <a href="/search">Search</a>
        <a href="/next" target="_blank">Open in new tab</a>""",
    "/next": "<title>Next</title><h1>The next page</h1><p>You made it.</p>",
    "/search": """<title>Search</title>
        <form action="/result"><label>Query <input name="q"></label><button>Go</button></form>""",
    "/slow": """<title>Slow</title><p id="busy">Loading...</p>
        <script>setTimeout(() => { document.getElementById('busy').remove();
          const d = document.createElement('div'); d.id = 'later'; d.textContent = 'Finally here';
          document.body.append(d); }, 300);</script>""",
    "/long": "<title>Long</title>" + "".join(f"<p style='height:100px'>row {i}</p>" for i in range(40)),
    "/console": """<title>Console</title><script>console.log('hello from the page');
        console.error('something bad');
        setTimeout(() => { throw new Error('uncaught kaboom'); });</script>""",
    "/widgets": """<title>Widgets</title>
        <label>Colour <select id="colour">
          <option value="r">Red</option><option value="g">Green</option></select></label>
        <button id="hov" onmouseover="this.textContent='Hovered'">Hover me</button>
        <input id="k" aria-label="Keys" onkeydown="document.title='key ' + event.key">
        <div style="height:3000px">tall</div>""",
    "/download": '<title>Download</title><a href="/file.txt" download>Get the file</a>',
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/result":
            from urllib.parse import parse_qs

            q = parse_qs(query).get("q", [""])[0]
            self._send(f"<title>Result</title><p>You searched for: {q}</p>")
        elif path == "/echo":
            headers = "".join(f"<li>{k}: {v}</li>" for k, v in self.headers.items())
            self._send(f"<title>Echo</title><ul>{headers}</ul>")
        elif path == "/file.txt":
            disposition = {"Content-Disposition": 'attachment; filename="file.txt"'}
            self._send("file contents\n", "text/plain", disposition)
        elif path in PAGES:
            self._send(PAGES[path])
        else:
            self.send_error(404)

    def _send(self, body: str, ctype: str = "text/html", extra: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[BrowserBackend]:
    b = BrowserBackend("browser", {})
    await b.warmup()
    yield b
    await b.shutdown()
    assert b.launcher.pids() == []


class Session:
    """One browser session and a terse way to call its tools."""

    def __init__(self, b: BrowserBackend, worker: str, state: BrowserSession) -> None:
        self.b, self.worker, self.state = b, worker, state

    async def __call__(self, tool: str, **kwargs: Any) -> Any:
        spec = self.b.tools()[tool]
        ctx = ToolContext(worker_id=self.worker, session_id=f"s-{self.worker}", state=self.state)
        if "args" in inspect.signature(spec.handler).parameters:
            return await spec.handler(self.b, ctx, spec.args_model(**kwargs))
        return await spec.handler(self.b, ctx)

    async def close(self) -> None:
        info = SimpleNamespace(
            session_id=f"s-{self.worker}",
            worker_id=self.worker,
            resource_type="browser",
            state=self.state,
            config=self.state.config,
        )
        await self.b.cleanup(self.worker, info)


@contextlib.asynccontextmanager
async def session(b: BrowserBackend, worker: str = "w1", **config: Any) -> AsyncIterator[Session]:
    state = await b.initialize(worker, b.session_config(config))
    s = Session(b, worker, state)
    try:
        yield s
    finally:
        await s.close()


def ref_of(snapshot: str, needle: str) -> str:
    """The ref on the first snapshot line containing `needle`."""
    for line in snapshot.splitlines():
        if needle in line and "[ref=" in line:
            return line.split("[ref=", 1)[1].split("]", 1)[0]
    raise AssertionError(f"{needle!r} not in snapshot:\n{snapshot}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        assert isinstance(shot.data, dict)
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


async def test_screenshot_stays_under_the_size_limit(site: str) -> None:
    b = BrowserBackend("browser", {"max_image_bytes": 64 * 1024})
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

    assert await asyncio.gather(*(journey(i) for i in range(6))) == ["Next"] * 6


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
        with pytest.raises(BackendError, match="ERR_CONNECTION_REFUSED") as refused:
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
    async with session(backend, timeout_ms=300) as s:
        await s("navigate", url=f"{site}/next")
        with pytest.raises(BackendError, match="boom") as thrown:
            await s("evaluate", expression="() => { throw new Error('boom'); }")
        assert thrown.value.code == 2001
        with pytest.raises(ExecutionTimeout) as timed_out:
            await s("click", selector="#does-not-exist")
        assert timed_out.value.code == 2002
        with pytest.raises(ExecutionTimeout, match="did not appear"):
            await s("wait_for", text="never shown", timeout_ms=200)
        with pytest.raises(ExecutionTimeout, match="closed"):
            await s("evaluate", expression="() => { while (true) {} }", timeout_ms=300)
        assert (await s("navigate", url=f"{site}/"))["title"] == "Home", "the session is usable afterwards"
        with pytest.raises(ParameterError, match="Unknown key"):
            await s("press", key="NoSuchKey")


async def test_config_is_validated(backend: BrowserBackend) -> None:
    with pytest.raises(pydantic.ValidationError):
        backend.session_config({"viewport": [10, 10]})
    with pytest.raises(pydantic.ValidationError):
        backend.session_config({"executable_path": "/bin/sh"})  # backend-wide only
    with pytest.raises(pydantic.ValidationError):
        backend.session_config({"bogus": 1})
    headed = backend.session_config({"headless": False})
    env = os.environ.pop("DISPLAY", None)
    try:
        with pytest.raises(ParameterError, match="display"):
            await backend.initialize("w", headed)
    finally:
        if env is not None:
            os.environ["DISPLAY"] = env


# -- crashes and leaks ----------------------------------------------------------------


async def test_killed_browser_is_relaunched_and_old_sessions_fail_cleanly(site: str) -> None:
    b = BrowserBackend("browser", {})
    await b.warmup()
    old = Session(b, "w1", await b.initialize("w1", b.session_config()))
    await old("navigate", url=f"{site}/next")
    first = b.launcher.pids()
    assert len(first) > 1, "the browser and its zygotes/renderers are all found"
    kill_pids(first)

    async def unhealthy() -> bool:
        return bool(await b.health(old.state))

    await eventually(unhealthy, what="the killed browser to be noticed")
    assert "crashed" in (await b.health(old.state) or "")
    with pytest.raises(SessionError, match="crashed") as caught:
        await old("snapshot")
    assert caught.value.code == 1003

    async with session(b, "w2") as new:  # the next session relaunches the browser
        assert (await new("navigate", url=f"{site}/next"))["title"] == "Next"
        assert not set(first) & set(b.launcher.pids())
    await old.close()
    await b.shutdown()
    assert b.launcher.pids() == []
    assert all(pids_with_marker(tag) == [] for tag in b.launcher.tags)
    assert all(b.launcher.pids_of(tag) == [] for tag in b.launcher.tags)


async def test_cleanup_closes_pages_and_shutdown_leaves_no_process(site: str) -> None:
    b = BrowserBackend("browser", {})
    async with session(b) as s:  # no warmup: the first session launches the browser
        await s("tabs", action="new", url=f"{site}/next")
        context = s.state.context
    assert context.pages == []
    assert s.state.closed
    await s.close()  # twice is harmless
    assert b.launcher.pids(), "the shared browser outlives its sessions"
    await b.shutdown()
    assert b.launcher.pids() == []


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb not installed")
async def test_headed_context_on_an_x_display(site: str) -> None:
    read, write = os.pipe()
    xvfb = await anyio.open_process(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=[write],
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    number = b""
    while not number.endswith(b"\n"):
        chunk = await asyncio.to_thread(os.read, read, 16)
        assert chunk, "Xvfb did not start"
        number += chunk
    os.close(read)
    b = BrowserBackend("browser", {})
    try:
        display = f":{number.decode().strip()}"
        async with session(b, headless=False, display=display, viewport=[640, 480]) as s:
            shot = await s("screenshot")
            assert (shot.data["width"], shot.data["height"]) == (640, 480)
            assert (await s("navigate", url=f"{site}/next"))["title"] == "Next"
            headed = s.state.handle
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
