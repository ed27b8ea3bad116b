"""langchain-mcp-adapters `MultiServerMCPClient.get_tools()` in its default shape: run the scenario.

`get_tools()` without `client.session(...)` opens a NEW MCP connection (an MCP handshake,
mcp<2) for every tool call, so state can only carry across calls through `session_id`.
Each call is a model tool call (`ainvoke` with a ToolCall), so the result is the
`ToolMessage` an agent would append: content blocks, `status` ("error" for isError) and the
structured content as the artifact.

Usage: python langchain_probe.py URL   (AGENTFLOW_SANDBOX_TOKEN: bearer token, if set)
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from scenario import emit, outcome, run, token_headers


def _flatten(content: Any) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, ["text"]
    texts, blocks = [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else "text"
        blocks.append(kind)
        if kind == "text":
            texts.append(block["text"] if isinstance(block, dict) else str(block))
    return "\n".join(texts), blocks


async def main(url: str) -> None:
    client = MultiServerMCPClient(
        {"sandbox": {"transport": "streamable_http", "url": url, "headers": token_headers(), "timeout": 60}}
    )
    tools = {tool.name: tool for tool in await client.get_tools()}
    calls = 0

    async def list_tools() -> list[str]:
        return list(tools)

    async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        message = await tools[name].ainvoke({"type": "tool_call", "name": name, "args": arguments, "id": f"c{calls}"})
        assert isinstance(message, ToolMessage), type(message)
        text, blocks = _flatten(message.content)
        artifact = message.artifact
        structured = artifact.get("structured_content") if isinstance(artifact, dict) else None
        return outcome(text, blocks, message.status == "error", structured)

    emit(await run(list_tools, call))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
