"""The direct HTTP path for plain 2026-07-28 tool calls (`mcp_server.fast_calls`).

It must answer exactly what the SDK answers for the same call, leave everything else to
the SDK (progress tokens, malformed bodies, refused hosts and origins), answer with plain
`application/json`, and cancel the call when the client disconnects. The in-process tests
serve the real app (engine, SDK app, fast path, auth) over an ASGI transport with a spy on
the SDK side; the others run a real `agentflow-sandbox serve`.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp_types import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR
from mcp_types import methods as surfaces
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.types import Receive, Scope, Send

from backends.base import Image
from manifests import load_manifest
from mcp_server.app import build_server, call_result
from mcp_server.factory import engine_from_manifest
from mcp_server.fast_calls import FastToolCalls
from mcp_server.transports import authenticated_app, http_app
from sandbox import Sandbox
from session.envelope import ResultMeta, failure, success
from session.errors import ParameterError
from session.tool_calls import CallOutcome
from tests.support import leaks, procs
from tests.support.leaks import session_pids
from tests.support.manifests import write_manifest
from tests.support.polling import eventually
from tests.support.servers import ServerProcess, new_token, running_http_server

MODERN = "2026-07-28"
WORKER_KEY = "agentflow/worker_id"
TOKEN = new_token()


def envelope_meta(**extra: Any) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "fast-path-test", "version": "0"},
        **extra,
    }


def tool_call(
    name: str, arguments: dict[str, Any], *, request_id: int = 1, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments, "_meta": envelope_meta(**(meta or {}))}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def modern_headers(name: str, token: str = TOKEN, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": name,
        **extra,
    }


_TIMING = re.compile(r'("(?:duration_ms|execution_time_ms|expires_at|created_at)": ?)("[^"]*"|[0-9.e-]+)')


def _blank_timing(text: str) -> str:
    return re.sub(r"expires [0-9T:.Z-]+", "expires X", _TIMING.sub(r"\1null", text))


def without_timing(message: dict[str, Any]) -> dict[str, Any]:
    """The JSON-RPC message with every timing value (in the text and the structured result) blanked."""
    for block in message.get("result", {}).get("content", []):
        if block.get("type") == "text":
            block["text"] = _blank_timing(block["text"])
    return json.loads(_blank_timing(json.dumps(message)))


class SdkSpy:
    """Wraps the SDK side of the app to count the requests that reached it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def serving(directory: Path) -> AsyncIterator[tuple[httpx2.AsyncClient, SdkSpy]]:
    """The real HTTP app (auth, fast path, SDK) on a real engine, over an ASGI transport.

    A context manager in the test's own task, not a fixture: the engine's and the SDK's task
    groups must be left in the task that entered them."""
    marker = leaks.new_test_marker()
    manifest = load_manifest(write_manifest(directory, session_ttl=30.0, test_marker=marker))
    try:
        async with engine_from_manifest(manifest) as engine:
            server = build_server(engine)
            app = http_app(engine, server)
            assert isinstance(app, FastToolCalls)
            assert app.enabled, "the fast path is off: the server has request middleware"
            spy = SdkSpy(app.app)
            app.app = spy
            transport = httpx2.ASGITransport(app=authenticated_app(app, {"default": TOKEN}))
            async with (
                server.session_manager.run(),
                httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http,
            ):
                yield http, spy
    finally:
        leaks.kill_leftovers(test_marker=marker)


async def post(http: httpx2.AsyncClient, message: dict[str, Any] | bytes, **headers: str) -> httpx2.Response:
    name = message["params"]["name"] if isinstance(message, dict) else "bash_run"
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return await http.post("/mcp", content=body, headers={**modern_headers(name), **headers})


def sse_messages(response: httpx2.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


async def test_the_fast_path_answers_exactly_what_the_sdk_answers(tmp_path: Path) -> None:
    """Same calls twice: plainly (fast path) and with a progress token (which the SDK serves, in
    JSON too when nothing was reported); the messages are equal but for timing values."""
    async with serving(tmp_path) as (http, spy):
        worker = uuid.uuid4().hex
        created = await post(http, tool_call("create_session", {"resource": "bash"}, meta={WORKER_KEY: worker}))
        assert created.status_code == 200, created.text
        calls: list[tuple[str, dict[str, Any]]] = [
            ("bash_run", {"command": "echo hi; echo oops >&2"}),
            ("bash_run", {"command": "false"}),  # a failing command: exit code 1
            ("bash_run", {"command": 7}),  # a bad argument: an error envelope
            ("list_sessions", {}),
            ("no_such_tool", {}),
        ]
        for request_id, (name, arguments) in enumerate(calls, start=10):
            before = spy.requests
            fast = await post(http, tool_call(name, arguments, request_id=request_id, meta={WORKER_KEY: worker}))
            assert spy.requests == before, f"{name} did not take the fast path"
            assert fast.status_code == 200
            assert fast.headers["content-type"] == "application/json"
            by_sdk = await post(
                http,
                tool_call(
                    name, arguments, request_id=request_id, meta={WORKER_KEY: worker, "progressToken": f"p{request_id}"}
                ),
            )
            assert spy.requests == before + 1, f"{name} with a progress token did not reach the SDK"
            assert by_sdk.status_code == 200
            sdk_message = (
                by_sdk.json() if by_sdk.headers["content-type"] == "application/json" else sse_messages(by_sdk)[-1]
            )
            assert without_timing(fast.json()) == without_timing(sdk_message), name
        result = fast.json()["result"]
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "agentflow-sandbox"
        assert result["isError"] is True
        assert result["resultType"] == "complete"


async def test_a_bad_worker_key_is_the_same_error_envelope_on_both_paths(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (http, spy):
        fast = await post(http, tool_call("list_sessions", {}, meta={WORKER_KEY: "short"}))
        by_sdk = await post(http, tool_call("list_sessions", {}, meta={WORKER_KEY: "short", "progressToken": 1}))
        assert spy.requests == 1
        assert fast.json()["result"]["structuredContent"]["code"] != 0
        assert without_timing(fast.json()) == without_timing(by_sdk.json())


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, PARSE_ERROR),
        (b"[1, 2]", {}, 400, INVALID_REQUEST),
        (
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": []}).encode(),
            {},
            400,
            INVALID_REQUEST,
        ),
        (
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "bash_run"}}).encode(),
            {},
            400,
            INVALID_PARAMS,
        ),
        (
            json.dumps(tool_call("bash_run", {"command": ":"})).encode(),
            {"Mcp-Name": "list_sessions"},
            400,
            HEADER_MISMATCH,
        ),
        (json.dumps(tool_call(12, {})).encode(), {"Mcp-Name": "12"}, 400, HEADER_MISMATCH),  # type: ignore[arg-type]
        (b'{"jsonrpc": "2.0", "id": 100000000000000000000000, "method": "tools/call"}', {}, 400, INVALID_PARAMS),
    ],
    ids=[
        "parse-error",
        "batch",
        "params-not-object",
        "no-envelope",
        "header-mismatch",
        "name-not-string",
        "huge-id",
    ],
)
async def test_malformed_requests_get_the_sdks_json_rpc_error(
    tmp_path: Path, body: bytes, headers: dict[str, str], status: int, code: int
) -> None:
    async with serving(tmp_path) as (http, spy):
        response = await post(http, body, **headers)
        assert spy.requests == 1, "a malformed request must fall through to the SDK"
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example:8000"}, 421),
        ({"Origin": "http://evil.example"}, 403),
        ({"Content-Type": "text/plain"}, 400),
        ({"Accept": "application/json"}, 406),
        ({"Authorization": "Bearer wrong-token-0123456789012345678901234567"}, 401),
    ],
    ids=["dns-rebinding-host", "foreign-origin", "content-type", "accept-without-sse", "wrong-token"],
)
async def test_refusals_are_unchanged(tmp_path: Path, headers: dict[str, str], status: int) -> None:
    async with serving(tmp_path) as (http, _):
        response = await post(http, tool_call("list_sessions", {}), **headers)
        assert response.status_code == status, response.text


async def test_other_methods_and_eras_go_to_the_sdk(tmp_path: Path) -> None:
    async with serving(tmp_path) as (http, spy):
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": envelope_meta()}}
        response = await http.post(
            "/mcp", content=json.dumps(listing).encode(), headers={**modern_headers(""), "Mcp-Method": "tools/list"}
        )
        assert response.status_code == 200
        assert any(tool["name"] == "bash_run" for tool in response.json()["result"]["tools"])
        assert spy.requests == 1
        # A query string can name an SSE session, which decides the worker: the SDK's to read.
        call = tool_call("list_sessions", {})
        response = await http.post(
            "/mcp?session_id=abc", content=json.dumps(call).encode(), headers=modern_headers("list_sessions")
        )
        assert response.status_code == 200
        assert spy.requests == 2


@pytest.mark.parametrize("version", [*MODERN_PROTOCOL_VERSIONS, *HANDSHAKE_PROTOCOL_VERSIONS])
def test_the_wire_result_is_what_the_sdk_sieve_makes_of_it(version: str) -> None:
    """The fast path sends `call_result` without the SDK's result sieve; the SDK's handler path
    sieves it. Equal only if the sieve gives it back unchanged (the handshake era drops resultType)."""
    meta = ResultMeta(tool="shot", resource_type="vm", session_id="vm-1")
    outcomes = [
        CallOutcome(success({"text": "é ✓", "nothing": None, "list": [1, None, {"x": None}]}, meta)),
        CallOutcome(failure(ParameterError("bad"), meta)),
        CallOutcome(success({}, meta), [Image(b"\x89PNG...", "image/png"), Image(b"GIF8", "image/gif")]),
    ]
    for outcome in outcomes:
        result = call_result(outcome)
        expected = result if version in MODERN_PROTOCOL_VERSIONS else {**result, "resultType": None}
        sieved = surfaces.serialize_server_result("tools/call", version, result)
        assert list(sieved.items()) == [(k, v) for k, v in expected.items() if v is not None]
        assert json.dumps(sieved) == json.dumps({k: v for k, v in expected.items() if v is not None})


# -- over a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_http_server(tmp_path_factory.mktemp("fast"), token=TOKEN) as running:
        yield running


@pytest.mark.slow
async def test_plain_json_answer_over_a_real_server(server: ServerProcess) -> None:
    """What a light client (plain JSON POSTs at 2026-07-28) relies on: one application/json body."""
    async with httpx2.AsyncClient(timeout=30.0) as http:
        message = tool_call("bash_run", {"command": "echo hi"}, meta={WORKER_KEY: uuid.uuid4().hex})
        response = await http.post(server.mcp_url, content=json.dumps(message), headers=modern_headers("bash_run"))
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["content-length"]) == len(response.content)
        envelope = response.json()["result"]["structuredContent"]
        assert envelope["data"]["stdout"] == "hi\n"
        assert envelope["meta"]["temporary_session"] is True
    assert "Traceback" not in server.log()


@pytest.mark.slow
async def test_progress_still_reaches_a_modern_http_client(server: ServerProcess) -> None:
    reports: list[tuple[float, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        reports.append((done, message))

    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        await sandbox.create_session("bash", {"progress_interval": 0.3})
        result = await sandbox.execute("bash:run", {"command": "sleep 1.5; echo done"}, progress=progress)
        quick = await sandbox.execute("bash:run", {"command": "echo quick"})
    assert result["data"]["stdout"] == "done\n"
    assert quick["data"]["stdout"] == "quick\n"
    assert len(reports) >= 2
    assert all(message and "running for" in message for _, message in reports)


@pytest.mark.slow
async def test_a_client_that_disconnects_mid_call_cancels_its_command(server: ServerProcess) -> None:
    """The connection closes while `sleep` runs: the command is interrupted, the shell stays usable."""
    worker = uuid.uuid4().hex
    marker = f"sleep 3{uuid.uuid4().int % 10**6:06d}"  # a unique duration names our sleep
    async with httpx2.AsyncClient(timeout=30.0) as http:
        created = await http.post(
            server.mcp_url,
            content=json.dumps(tool_call("create_session", {"resource": "bash"}, meta={WORKER_KEY: worker})),
            headers=modern_headers("create_session"),
        )
        assert created.json()["result"]["isError"] is False

    body = json.dumps(tool_call("bash_run", {"command": marker}, meta={WORKER_KEY: worker})).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in modern_headers("bash_run").items())
    request = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{head}Content-Length: {len(body)}\r\n\r\n"

    def sleepers() -> list[int]:
        return [pid for pid in session_pids(test_marker=server.run_id) if procs.command_line(pid) == marker]

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request.encode() + body)
        await eventually(sleepers, 15, what="the sleep to start")
    await eventually(lambda: not sleepers(), 15, what="the sleep to be interrupted")

    async with httpx2.AsyncClient(timeout=30.0) as http:
        again = await http.post(
            server.mcp_url,
            content=json.dumps(tool_call("bash_run", {"command": "echo still-usable"}, meta={WORKER_KEY: worker})),
            headers=modern_headers("bash_run"),
        )
    envelope = again.json()["result"]["structuredContent"]
    assert envelope["data"]["stdout"] == "still-usable\n"
    assert envelope["meta"]["temporary_session"] is False
    assert "Traceback" not in server.log()


@pytest.mark.slow
async def test_both_eras_of_the_official_client_still_work(server: ServerProcess) -> None:
    for mode in ("auto", "legacy"):
        async with Sandbox(url=server.mcp_url, token=server.token, mode=mode) as sandbox:
            await sandbox.create_session("bash")
            await sandbox.execute("bash:run", {"command": "cd /tmp"})
            result = await sandbox.execute("bash:run", {"command": "pwd"})
            assert result["data"]["stdout"] == "/tmp\n", mode

