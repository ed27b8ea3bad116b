"""langchain-mcp-adapters `get_tools()` over stdio: a new server process for every tool call.

Nothing can outlive a call there, so a `session_id` from `create_session` names a session of a
process that is gone by the next call. The probe records what the model is told then.

Usage: python langchain_stdio_probe.py '<server argv as a JSON list>'
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from scenario import emit, guarded, outcome, session_handle


async def main(argv: list[str]) -> None:
    client = MultiServerMCPClient({"sandbox": {"transport": "stdio", "command": argv[0], "args": argv[1:]}})
    tools = {tool.name: tool for tool in await client.get_tools()}
    calls = 0

    async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        message = await tools[name].ainvoke({"type": "tool_call", "name": name, "args": arguments, "id": f"c{calls}"})
        assert isinstance(message, ToolMessage), type(message)
        text = "\n".join(b["text"] for b in message.content if isinstance(b, dict) and b.get("type") == "text")
        return outcome(text, [b.get("type", "text") for b in message.content], message.status == "error")

    result: dict[str, Any] = {"create": await guarded(call, "create_session", {"resource": "bash"})}
    handle = session_handle(result["create"])
    result["session_id"] = handle
    if handle is not None:
        result["by_handle"] = await guarded(call, "bash_run", {"command": "pwd", "session_id": handle})
    emit(result)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
