"""Clients of the cluster tests: the `Sandbox` client, a plain 2026-07-28 MCP client, and a raw
connection-holding (Mcp-Session-Id) HTTP client that survives its server being SIGKILLed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from sandbox import Sandbox
from tests.support.envelopes import envelope
from tests.support.servers import ServerProcess

#: Keeps a shell's state, then reports it with the session tag: `parse_state` reads it back.
STATE_COMMAND = 'cd /tmp && export AF_STATE=kept-42; sleep 300 & echo "$AGENTFLOW_SESSION"'
STATE_CHECK = 'echo "$PWD ${AF_STATE:-unset} $AGENTFLOW_SESSION"'
LEGACY_REVISION = "2025-11-25"


def sandbox(server: ServerProcess, **options: Any) -> Sandbox:
    """A `Sandbox` worker on `server` with the cluster's shared token."""
    return Sandbox(url=server.mcp_url, token=server.token, **options)


@asynccontextmanager
async def stateless_client(server: ServerProcess) -> AsyncIterator[Client]:
    """A plain `mcp.Client` speaking 2026-07-28 (no handshake, no worker key): state only by handle."""
    async with server.http_client() as http, Client(streamable_http_client(server.mcp_url, http_client=http)) as client:
        yield client


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The envelope of one tool call through a plain client."""
    return envelope(await client.call_tool(tool, arguments))


def sessions_by_id(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["session_id"]: s for s in listing["sessions"]}


class LegacyConnection:
    """A 2025-11-25 streamable-HTTP connection (one worker = its Mcp-Session-Id), spoken raw over httpx.

    Raw so that its server being SIGKILLed is only a failed request, not a transport task group
    failing inside the SDK client.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.http = httpx2.AsyncClient(headers=server.headers, timeout=httpx2.Timeout(30.0))
        self.session_header: str | None = None
        self._id = 0

    async def __aenter__(self) -> LegacyConnection:
        init = await self._post(
            "initialize",
            {"protocolVersion": LEGACY_REVISION, "capabilities": {}, "clientInfo": {"name": "af-test", "version": "1"}},
        )
        assert init["result"]["protocolVersion"] == LEGACY_REVISION, init
        await self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.aclose()

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The envelope (structuredContent) of a tools/call."""
        reply = await self._post("tools/call", {"name": name, "arguments": arguments})
        assert "result" in reply, reply
        structured: dict[str, Any] = reply["result"]["structuredContent"]
        return structured

    async def _post(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        response = await self._send({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params})
        if self.session_header is None:
            self.session_header = response.headers.get("mcp-session-id")
        return _jsonrpc_reply(response)

    async def _send(self, message: dict[str, Any]) -> httpx2.Response:
        headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": LEGACY_REVISION}
        if self.session_header:
            headers["Mcp-Session-Id"] = self.session_header
        response = await self.http.post(self.server.mcp_url, json=message, headers=headers)
        response.raise_for_status()
        return response


def _jsonrpc_reply(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC response in a JSON body or in the last `data:` event of an SSE body."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        replies = [json.loads(e) for e in events if e]
        replies = [r for r in replies if "id" in r]
        assert replies, response.text
        last: dict[str, Any] = replies[-1]
        return last
    body: dict[str, Any] = response.json()
    return body
