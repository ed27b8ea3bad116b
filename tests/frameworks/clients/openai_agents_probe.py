"""openai-agents `MCPServerStreamableHttp`: run the scenario through the FunctionTools an Agent gets.

Each call goes through `FunctionTool.on_invoke_tool`, i.e. exactly what the agent loop hands the
model, with the strict schema conversion the SDK applies (`convert_schemas_to_strict`).
`client_session_timeout_seconds` is raised from its 5 s default: a desktop's first screenshot
or a long command takes longer.

Usage: python openai_agents_probe.py URL   (AGENTFLOW_SANDBOX_TOKEN: bearer token, if set)
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from agents import Agent, FunctionTool, RunContextWrapper
from agents.mcp import MCPServerStreamableHttp
from agents.tool_context import ToolContext
from scenario import emit, outcome, run, token_headers


def _flatten(output: Any) -> tuple[str, list[str]]:
    items = output if isinstance(output, list) else [output]
    texts, blocks = [], []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
        if kind == "text":
            texts.append(item["text"] if isinstance(item, dict) else item.text)
            blocks.append("text")
        elif kind == "image":
            blocks.append("image")
        else:
            texts.append(str(item))
            blocks.append("text")
    return "\n".join(texts), blocks


async def main(url: str) -> None:
    server = MCPServerStreamableHttp(
        params={"url": url, "headers": token_headers(), "timeout": 60},
        client_session_timeout_seconds=60,
        cache_tools_list=True,
    )
    async with server:
        agent = Agent(name="probe", mcp_servers=[server], mcp_config={"convert_schemas_to_strict": True})
        tools = {tool.name: tool for tool in await agent.get_all_tools(RunContextWrapper(context=None))}

        async def list_tools() -> list[str]:
            return list(tools)

        async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            tool = tools[name]
            assert isinstance(tool, FunctionTool)
            raw = json.dumps(arguments)
            context = ToolContext(context=None, tool_name=name, tool_call_id="call-1", tool_arguments=raw)
            text, blocks = _flatten(await tool.on_invoke_tool(context, raw))
            # A FunctionTool has no error flag: the model reads the error from the text.
            return outcome(text, blocks, None)

        result = await run(list_tools, call)
        result["strict"] = {
            name: tool.strict_json_schema for name, tool in tools.items() if isinstance(tool, FunctionTool)
        }
        raw = await server.call_tool("bash_run", {"command": "true", "timeout": -1})
        result["bad_argument_raw"] = {"is_error": raw.is_error}
    emit(result)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
