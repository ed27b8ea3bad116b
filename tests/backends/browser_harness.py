"""Driving the v2 browser backend directly (no engine): sites to browse, sessions, tool calls.

Used by tests/backends/test_browser.py and tests/security/test_browser_*.py. Sessions are
built the way the engine builds them: a `SessionSetup` with the policy in force and a
scratch directory made before `initialize` and removed after `cleanup`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from pydantic import BaseModel

from backends.base import Runtime, SessionSetup, ToolContext, ToolResult
from backends.browser import BrowserBackend
from backends.browser.session import BrowserSession
from backends.policy import Policy

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


class Site:
    """A real HTTP server on 127.0.0.1 serving `PAGES`; records every path it was asked for.

    `/redirect?to=URL` answers 302 to URL (to test that redirects are checked too).
    """

    def __init__(self) -> None:
        self.hits: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits.append(self.path)
                path, _, query = self.path.partition("?")
                if path == "/result":
                    q = parse_qs(query).get("q", [""])[0]
                    self._send(f"<title>Result</title><p>You searched for: {q}</p>")
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
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

            def do_POST(self) -> None:
                self.do_GET()

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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def allow(self) -> str:
        """The `allow_private_hosts` entry that lets pages reach this site (and only it)."""
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def running_site() -> Iterator[Site]:
    site = Site()
    try:
        yield site
    finally:
        site.close()


class Listener:
    """A raw TCP listener on 127.0.0.1 that counts the connections it accepts (nothing else)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@contextlib.contextmanager
def scratch_root() -> Iterator[Path]:
    """A per-run scratch root in the system temporary directory, mode 0711 like the engine's.

    (pytest's own tmp dirs are 0700 all the way up: the browser's uid could not reach a
    launch dir there.) Everything this run's browsers start carries this path, so leak
    checks count only this run's processes.
    """
    root = Path(tempfile.mkdtemp(prefix="agentflow-test-browser-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_backend(
    scratch_root: Path, *, settings: dict[str, Any] | None = None, policy: Policy | None = None
) -> BrowserBackend:
    """A backend whose runtime scratch root is `scratch_root` (made 0711, as the engine makes it)."""
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch_root.chmod(0o711)
    runtime = Runtime(scratch_root=scratch_root, server_id=f"test-{uuid.uuid4().hex[:8]}")
    return BrowserBackend("browser", settings=settings or {}, policy=policy, runtime=runtime)


class Session:
    """One browser session and a terse way to call its tools.

    A call returns the tool's result model as a dict (asserting it *is* a pydantic model),
    or a ToolResult whose `data` is that dict, so tests read fields by name.
    """

    def __init__(self, b: BrowserBackend, setup: SessionSetup[Any], state: BrowserSession) -> None:
        self.b, self.setup, self.state = b, setup, state
        self.closed = False

    async def raw(self, tool: str, **kwargs: Any) -> Any:
        spec = self.b.tools()[tool]
        ctx = ToolContext(config=self.setup.config, state=self.state, session=self.setup)
        if spec.takes_args:
            return await spec.handler(self.b, ctx, spec.args_model(**kwargs))
        return await spec.handler(self.b, ctx)

    async def __call__(self, tool: str, **kwargs: Any) -> Any:
        result = await self.raw(tool, **kwargs)
        if isinstance(result, ToolResult):
            assert isinstance(result.data, BaseModel)
            return ToolResult(data=result.data.model_dump(), images=result.images)
        assert isinstance(result, BaseModel), f"{tool} returned {type(result).__name__}, not a result model"
        return result.model_dump()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.b.cleanup(self.setup, self.state)
            shutil.rmtree(self.setup.scratch, ignore_errors=True)


def session_setup(
    b: BrowserBackend,
    label: str = "s1",
    *,
    allow: list[str] | None = None,
    policy: Policy | None = None,
    links: dict[str, Any] | None = None,
    **config: Any,
) -> SessionSetup[Any]:
    if policy is None:
        policy = Policy(network="internet", allow_private_hosts=allow or [])
    scratch = b.runtime.scratch_root / f"session-{label}-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(parents=True)
    return SessionSetup(
        worker_id=f"w-{label}",
        session_id=f"sid-{uuid.uuid4().hex}",
        label=label,
        resource="browser",
        config=b.session_config(config),
        policy=policy,
        scratch=scratch,
        links=links or {},
    )


@contextlib.asynccontextmanager
async def session(
    b: BrowserBackend,
    label: str = "s1",
    *,
    allow: list[str] | None = None,
    policy: Policy | None = None,
    links: dict[str, Any] | None = None,
    **config: Any,
) -> AsyncIterator[Session]:
    setup = session_setup(b, label, allow=allow, policy=policy, links=links, **config)
    try:
        state = await b.initialize(setup)
    except BaseException:
        shutil.rmtree(setup.scratch, ignore_errors=True)
        raise
    s = Session(b, setup, state)
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


def pids_under(root: Path) -> list[int]:
    """Live processes whose command line or environment mentions `root` (this run's scratch root)."""
    needle = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in blob:
            found.append(int(entry.name))
    return found
