"""A stdio MCP client run as its own process, so a test can SIGKILL it mid-session.

argv: the manifest path, then the server command. It spawns the server over stdio,
creates a bash session (no worker key), runs the probe, prints one JSON line
`{"tag", "shell_pid", "server_pid", "session_id"}` and then waits forever.
"""

from __future__ import annotations

import json
import sys

import anyio
from mcp import Client, StdioServerParameters

PROBE = 'sleep 300 & echo "$AGENTFLOW_SESSION $$ $PPID"'


async def main(manifest: str, command: list[str]) -> None:
    params = StdioServerParameters(
        command=command[0], args=[*command[1:], "serve", "--transport", "stdio", "--manifest", manifest]
    )
    async with Client(params) as client:
        created = await client.call_tool("create_session", {"resource": "bash"})
        ran = await client.call_tool("bash_run", {"command": PROBE})
        tag, shell_pid, server_pid = ran.structured_content["data"]["stdout"].split()
        line = {
            "tag": tag,
            "shell_pid": int(shell_pid),
            "server_pid": int(server_pid),
            "session_id": created.structured_content["data"]["session_id"],
            "meta": ran.structured_content["meta"],
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2:])
