"""Bearer tokens and HTTP hardening, against real `agentflow-sandbox serve` subprocesses.

Who may call: every MCP request over HTTP and SSE needs `Authorization: Bearer <token>`
(401 + `WWW-Authenticate: Bearer` otherwise), `GET /health` stays open and says nothing
but "running"; tokens come from AGENTFLOW_SANDBOX_TOKEN, the manifest's `server.tokens`
(one principal each) or a generated 0600 token file that `Sandbox(url)` finds by port.
Hardening: refused requests are rate limited per address (429), the connection cap
answers 503, and a client that trickles its headers is cut off by the header deadline
while a long tool call and an open SSE stream carry on.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mcp_server.auth import BearerAuth
from sandbox import Sandbox
from session.errors import PermissionDenied
from tests.support.leaks import session_pids
from tests.support.manifests import write_manifest
from tests.support.polling import eventually
from tests.support.ports import free_port, trickle_headers
from tests.support.servers import TOKEN_ENV, ServerProcess, new_token, running_http_server, server_command

pytestmark = pytest.mark.slow

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "auth-test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def raw_request(
    server: ServerProcess, method: str, path: str, headers: dict[str, str], http: httpx2.AsyncClient | None = None
) -> httpx2.Response:
    """One request (an SSE answer is read up to its headers only), on `http` or a new client."""
    if http is None:
        async with httpx2.AsyncClient(timeout=10.0) as own:
            return await raw_request(server, method, path, headers, own)
    body = json.dumps(INIT).encode() if method == "POST" else None
    request = http.build_request(method, f"{server.base}{path}", headers={**MCP_HEADERS, **headers}, content=body)
    response = await http.send(request, stream=True)
    if response.status_code != 200 or path != "/sse":
        await response.aread()
    await response.aclose()
    return response


def refused_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log_path.read_text(errors="replace").splitlines() if "refused" in line]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_http_server(tmp_path_factory.mktemp("auth")) as server:
        yield server


# -- who may call --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/mcp"), ("GET", "/mcp"), ("GET", "/sse"), ("POST", "/messages/")]
)
async def test_no_token_is_401_with_bearer_challenge(auth_server: ServerProcess, method: str, path: str) -> None:
    response = await raw_request(auth_server, method, path, {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["error"] == "unauthorized"
    assert "Authorization: Bearer" in body["message"]


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token-wrong-token-wrong-token-0",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "{token}",  # the right token without the scheme
        "Bearer {token}x",
    ],
)
async def test_wrong_token_is_401(auth_server: ServerProcess, authorization: str) -> None:
    assert auth_server.token is not None
    header = authorization.format(token=auth_server.token)
    for path, method in (("/mcp", "POST"), ("/sse", "GET")):
        response = await raw_request(auth_server, method, path, {"Authorization": header})
        assert response.status_code == 401, (path, response.status_code)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert auth_server.token not in response.text


async def test_right_token_passes_and_health_is_open_and_says_nothing(auth_server: ServerProcess) -> None:
    ok = await raw_request(auth_server, "POST", "/mcp", auth_server.headers)
    assert ok.status_code == 200
    async with Sandbox(url=auth_server.mcp_url, token=auth_server.token) as sandbox:
        await sandbox.create_session("bash")
        result = await sandbox.execute("bash:run", {"command": "echo $((6*7))"})
        assert result["data"]["stdout"] == "42\n"
        # With a live session, the unauthenticated health check still reveals no counts.
        async with httpx2.AsyncClient() as http:
            health = await http.get(f"{auth_server.base}/health")
        assert health.status_code == 200
        assert health.json() == {"status": "running"}
    log = auth_server.log()
    assert auth_server.token is not None
    assert auth_server.token not in log


async def test_two_principals_each_work(tmp_path: Path) -> None:
    """`server.tokens` with two principals: each token works over HTTP and SSE; others are refused."""
    alice, bob = new_token(), new_token()
    settings = {"tokens": {"alice": alice, "bob": bob}}
    with anyio.fail_after(60), running_http_server(tmp_path, token=None, server_settings=settings) as server:
        assert server.state_home is not None
        assert not (server.state_home / "agentflow-sandbox").exists(), "no token file when tokens are configured"
        for token in (alice, bob):
            for url in (server.mcp_url, server.sse_url):
                async with Sandbox(url=url, token=token) as sandbox:
                    result = await sandbox.execute("bash:run", {"command": "echo ok"})
                    assert result["data"]["stdout"] == "ok\n"
        with pytest.raises(PermissionDenied) as refused:
            async with Sandbox(url=server.mcp_url, token=new_token()):
                pass
        assert refused.value.code == 1006
        assert "token argument" in str(refused.value)
        log = server.log()
        assert alice not in log
        assert bob not in log


async def test_environment_token_overrides_manifest_tokens(tmp_path: Path) -> None:
    """AGENTFLOW_SANDBOX_TOKEN wins over `server.tokens`: it alone is accepted (principal "default")."""
    manifest_token, env_token = new_token(), new_token()
    settings = {"tokens": {"alice": manifest_token}}
    with anyio.fail_after(60), running_http_server(tmp_path, token=env_token, server_settings=settings) as server:
        accepted = await raw_request(server, "POST", "/mcp", {"Authorization": f"Bearer {env_token}"})
        assert accepted.status_code == 200
        refused = await raw_request(server, "POST", "/mcp", {"Authorization": f"Bearer {manifest_token}"})
        assert refused.status_code == 401


async def test_principal_name_reaches_request_state() -> None:
    """The middleware stores the principal's name (never the token) at `request.state.principal`."""
    alice, bob = new_token(), new_token()

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"principal": getattr(request.state, "principal", None)})

    app = Starlette(routes=[Route("/mcp", whoami), Route("/health", whoami)])

    async def ask(asgi: Any, path: str, token: str | None) -> tuple[int, Any]:
        transport = httpx2.ASGITransport(app=asgi, client=("127.0.0.1", 1234))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            response = await http.get(path, headers=headers)
        return response.status_code, response.json()

    guarded = BearerAuth(app, {"alice": alice, "bob": bob})
    assert await ask(guarded, "/mcp", alice) == (200, {"principal": "alice"})
    assert await ask(guarded, "/mcp", bob) == (200, {"principal": "bob"})
    assert (await ask(guarded, "/mcp", None))[0] == 401
    assert await ask(guarded, "/health", None) == (200, {"principal": None})
    assert await ask(BearerAuth(app, None), "/mcp", None) == (200, {"principal": "default"})


# -- where the token comes from ------------------------------------------------------------------


async def test_generated_token_file_is_private_and_sandbox_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No variable, no manifest tokens: a token is generated into a 0600 file named by port; Sandbox(url) reads it."""
    with anyio.fail_after(60), running_http_server(tmp_path, token=None) as server:
        assert server.state_home is not None
        token_dir = server.state_home / "agentflow-sandbox"
        token_file = token_dir / f"token-{server.port}"
        assert token_file.exists()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_dir.stat().st_mode) == 0o700
        token = token_file.read_text().strip()
        assert len(token) >= 32
        log = server.log_path.read_text()
        assert str(token_file) in log
        assert token not in log

        # A second server on the same port is refused before it could overwrite the token file.
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env["XDG_STATE_HOME"] = str(server.state_home)
        second = serve_and_wait(["--host", "127.0.0.1", "--port", str(server.port)], env, tmp_path)
        assert second.returncode == 2
        assert "cannot listen" in second.stderr
        assert "Traceback" not in second.stderr
        assert token_file.read_text().strip() == token

        monkeypatch.delenv(TOKEN_ENV, raising=False)
        monkeypatch.setenv("XDG_STATE_HOME", str(server.state_home))
        for url in (server.mcp_url, server.sse_url):
            async with Sandbox(url=url) as sandbox:
                result = await sandbox.execute("bash:run", {"command": "echo found"})
                assert result["data"]["stdout"] == "found\n"

        # Elsewhere (no variable, no file for this port) the error says where a token is looked for.
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "empty"))
        with pytest.raises(PermissionDenied) as missing:
            async with Sandbox(url=server.mcp_url):
                pass
        assert missing.value.code == 1006
        assert TOKEN_ENV in str(missing.value)
        assert f"token-{server.port}" in str(missing.value)
    assert not token_file.exists(), "a stopped server removes the token file it generated"


def serve_and_wait(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    manifest = write_manifest(tmp_path, test_marker="refused")
    return subprocess.run(
        [*server_command(), "serve", "--transport", "http", "--manifest", str(manifest), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.com"])
def test_no_auth_refused_on_non_loopback_host(host: str, tmp_path: Path) -> None:
    completed = serve_and_wait(["--no-auth", "--host", host, "--port", str(free_port())], dict(os.environ), tmp_path)
    assert completed.returncode == 2
    assert "--no-auth" in completed.stderr
    assert "loopback" in completed.stderr


def test_short_token_in_environment_is_a_configuration_error(tmp_path: Path) -> None:
    short = "only-twenty-chars-xx"
    env = {**os.environ, TOKEN_ENV: short}
    completed = serve_and_wait(["--host", "127.0.0.1", "--port", str(free_port())], env, tmp_path)
    assert completed.returncode == 2
    assert TOKEN_ENV in completed.stderr
    assert "32 characters" in completed.stderr
    assert short not in completed.stderr


async def test_no_auth_on_loopback_serves_without_token(tmp_path: Path) -> None:
    with anyio.fail_after(60), running_http_server(tmp_path, token=None, extra_args=("--no-auth",)) as server:
        assert server.token is None
        async with Sandbox(url=server.mcp_url, token=None) as sandbox:
            assert (await sandbox.execute("bash:run", {"command": "echo open"}))["data"]["stdout"] == "open\n"
        assert "--no-auth" in server.log()


# -- hardening -----------------------------------------------------------------------------------


async def test_burst_of_bad_tokens_is_rate_limited(tmp_path: Path) -> None:
    """A bounded loop of wrong tokens: the first get 401, then 429 without comparing; the log stays short."""
    with anyio.fail_after(120), running_http_server(tmp_path) as server:
        statuses: list[int] = []
        started = anyio.current_time()
        async with httpx2.AsyncClient(timeout=10.0) as http:
            for attempt in range(150):
                guess = {"Authorization": f"Bearer guess-{attempt:040d}"}
                response = await raw_request(server, "POST", "/mcp", guess, http)
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert response.headers["retry-after"]
                    assert response.json()["error"] == "too_many_requests"
        elapsed = anyio.current_time() - started
        # A budget of 20 refusals per address, refilled at 2 per second.
        assert statuses[:20] == [401] * 20
        assert set(statuses) == {401, 429}
        # One line per refused request at most, itself rate limited (a burst of 5, then 1 per second).
        lines = refused_lines(server)
        assert 1 <= len(lines) <= 6 + elapsed, lines
        assert "guess-" not in server.log()

        # Once the burst is over the budget refills and the right token works again.
        async def right_token_status() -> int:
            return (await raw_request(server, "POST", "/mcp", server.headers)).status_code

        for _ in range(150):  # ~30 s at most
            status = await right_token_status()
            if status != 429:
                break
            await anyio.sleep(0.2)
        assert status == 200


def open_idle_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _established(pid: int, port: int) -> int:
    """Connections the server process holds open on its listening port."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


def http_get_on(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET on `sock`; the whole response (headers and Content-Length body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


async def test_connection_cap_refuses_excess_cleanly(tmp_path: Path) -> None:
    """`server.max_connections`: the connection past the cap gets a 503; the open ones keep working."""
    cap = 6
    settings = {"max_connections": cap}
    with anyio.fail_after(60), running_http_server(tmp_path, server_settings=settings) as server:
        held = [open_idle_connection(server.port) for _ in range(cap)]
        try:
            # Each held connection is known to the server once it has answered a request on it.
            for sock in held:
                assert http_get_on(sock, "/health").startswith(b"HTTP/1.1 200")
            async with httpx2.AsyncClient(timeout=10.0) as http:
                refused = await http.get(f"{server.base}/health")
            assert refused.status_code == 503
            # The workers already connected are unaffected, once the server has dropped the refused
            # connection (uvicorn counts every open connection, and the close is asynchronous).
            await eventually(lambda: _established(server.process.pid, server.port) <= cap)
            assert http_get_on(held[0], "/health").startswith(b"HTTP/1.1 200")
            # A flood of connections that send nothing: past twice the cap each is answered 503 and
            # closed at once, before the server reads a byte.
            held += [open_idle_connection(server.port) for _ in range(cap)]
            flooding = open_idle_connection(server.port)
            held.append(flooding)
            answer = b""
            while chunk := flooding.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"too many open connections" in answer
        finally:
            for sock in held:
                sock.close()

        async def admitted() -> bool:
            async with httpx2.AsyncClient(timeout=10.0) as http:
                return (await http.get(f"{server.base}/health")).status_code == 200

        deadline = anyio.current_time() + 15
        while not await admitted():
            assert anyio.current_time() < deadline, "connections were not admitted again after the others closed"
            await anyio.sleep(0.1)
        assert "Traceback" not in server.log()


async def test_slow_headers_are_cut_while_long_call_and_sse_stream_survive(tmp_path: Path) -> None:
    """Header deadline 1 s, idle timeout 1 s: a client trickling its headers is disconnected, while a
    4 s tool call on another connection completes and an SSE stream and a handshake HTTP client's
    listen stream, opened before, stay usable with their sessions."""
    settings = {"header_timeout": 1.0, "keep_alive_timeout": 1.0}
    with anyio.fail_after(90), running_http_server(tmp_path, server_settings=settings) as server:
        async with (
            Sandbox(url=server.sse_url, token=server.token) as sse_worker,
            Sandbox(url=server.mcp_url, token=server.token, mode="legacy") as listening_worker,
        ):
            await sse_worker.create_session("bash")
            await listening_worker.create_session("bash")
            call_done = anyio.Event()
            result: dict[str, Any] = {}

            async def long_call() -> None:
                async with Sandbox(url=server.mcp_url, token=server.token) as worker:
                    result.update(await worker.execute("bash:run", {"command": "sleep 4; echo finished"}))
                call_done.set()

            def slowloris() -> str:  # at most ~60 s of trickling, far beyond the 1 s deadline
                return trickle_headers(server.port, "/health", every=0.2, rounds=300)

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_call)
                assert await anyio.to_thread.run_sync(slowloris) == "closed"
                await call_done.wait()
            assert result["code"] == 0, result
            assert result["data"]["stdout"] == "finished\n"
            # The SSE stream and the handshake client's listen stream outlived both timeouts.
            for worker in (sse_worker, listening_worker):
                again = await worker.execute("bash:run", {"command": "echo still-here"})
                assert again["code"] == 0, again
                assert again["meta"]["temporary_session"] is False
                assert again["data"]["stdout"] == "still-here\n"
        await eventually(lambda: not session_pids(test_marker=server.run_id), 15, what="the sessions to end")
        assert "Traceback" not in server.log()


async def test_transport_sessions_belong_to_their_principal(tmp_path: Path) -> None:
    """Bob naming Alice's Mcp-Session-Id or SSE session_id gets 404 (the SDK's ownership check, fed
    by the middleware's `scope["user"]`); Alice's own requests pass."""
    alice, bob = new_token(), new_token()
    settings = {"tokens": {"alice": alice, "bob": bob}}
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    initialized = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    with anyio.fail_after(60), running_http_server(tmp_path, token=None, server_settings=settings) as server:
        async with httpx2.AsyncClient(base_url=server.base, timeout=10.0, headers=MCP_HEADERS) as http:
            opened = await http.post("/mcp", headers=as_alice, content=json.dumps(INIT).encode())
            assert opened.status_code == 200
            session = opened.headers["mcp-session-id"]
            for who, expected in ((as_bob, 404), (as_alice, 202)):
                sent = await http.post("/mcp", headers={**who, "mcp-session-id": session}, content=initialized)
                assert sent.status_code == expected, (who == as_bob, sent.status_code, sent.text)

            async with http.stream("GET", "/sse", headers={**as_alice, "Accept": "text/event-stream"}) as stream:
                assert stream.status_code == 200
                # One iterator kept alive: abandoning an iterator of the stream would close it.
                lines = stream.aiter_lines()
                line = ""
                while not line.startswith("data:"):
                    line = await anext(lines)
                endpoint = line.removeprefix("data:").strip()
                assert "session_id=" in endpoint
                ping = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "ping"}).encode()
                for who, expected in ((as_bob, 404), (as_alice, 202)):
                    posted = await http.post(endpoint, headers=who, content=ping)
                    assert posted.status_code == expected, (who == as_bob, posted.status_code, posted.text)


async def test_garbage_requests_do_not_flood_the_log(tmp_path: Path) -> None:
    """Bytes that are not HTTP get a 400 each; uvicorn's warning about them is rate limited in the log."""
    with anyio.fail_after(60), running_http_server(tmp_path) as server:
        started = anyio.current_time()

        def send_garbage() -> list[bytes]:
            answers = []
            for _ in range(60):
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
                    answers.append(sock.recv(64))
            return answers

        answers = await anyio.to_thread.run_sync(send_garbage)
        elapsed = anyio.current_time() - started
        assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers), set(answers)
        lines = [line for line in server.log_path.read_text().splitlines() if "Invalid HTTP request" in line]
        assert 1 <= len(lines) <= 6 + elapsed, lines
        assert "Traceback" not in server.log()
        assert server.health() == {"status": "running"}


def test_the_listener_turns_nagle_off_for_every_connection() -> None:
    """asyncio disables Nagle only on sockets whose proto is TCP; a proto-0 listener made every
    keep-alive response wait ~40 ms for the client's delayed ACK."""
    import socket as socket_module

    from mcp_server.transports import _listen

    listener = _listen("127.0.0.1", 0)
    try:
        assert listener.proto == socket_module.IPPROTO_TCP
        assert listener.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY)
        listener.listen()
        client = socket_module.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            assert accepted.proto == socket_module.IPPROTO_TCP
            assert accepted.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY)
    finally:
        listener.close()
