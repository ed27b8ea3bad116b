"""fastmcp `Client(url)` in its default mode (2026-07-28 over streamable HTTP): run the scenario.

Usage: python fastmcp_probe.py URL   (AGENTFLOW_SANDBOX_TOKEN: bearer token, if the server wants one)
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from fastmcp import Client
from scenario import emit, outcome, run


async def main(url: str) -> None:
    token = os.environ.get("AGENTFLOW_SANDBOX_TOKEN")
    async with Client(url, auth=token, timeout=60) as client:

        async def list_tools() -> list[str]:
            return [tool.name for tool in await client.list_tools()]

        async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            # raise_on_error=False: look at the result a model gets, flagged or not.
            result = await client.call_tool(name, arguments, raise_on_error=False)
            texts = [block.text for block in result.content if block.type == "text"]
            blocks = [block.type for block in result.content]
            return outcome("\n".join(texts), blocks, result.is_error, result.structured_content)

        result = await run(list_tools, call)
        result["protocol_version"] = getattr(client, "protocol_version", None)
    emit(result)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
