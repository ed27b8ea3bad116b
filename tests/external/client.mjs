// A third-party MCP client (the official TypeScript SDK) driving agentflow-sandbox.
//
//   node client.mjs --stdio <command> [args...]   spawn the server over stdio
//   node client.mjs --http <url>                  streamable HTTP (handshake, Mcp-Session-Id)
//   node client.mjs --sse <url>                   legacy SSE
//   options, before the transport flag:
//   --hold          print the results, then wait for a line on stdin before closing, so the
//                   caller can inspect the process table while connected
//   --no-terminate  over HTTP, close without DELETE: the TS SDK's close() only aborts its
//                   streams; terminateSession() is what sends DELETE (done by default here)
//
// Over HTTP and SSE the bearer token is read from AGENTFLOW_SANDBOX_TOKEN and sent as
// `Authorization: Bearer` through the transports' `requestInit` (the SSE transport sends those
// headers on its GET stream too).
//
// Prints one JSON line with the results, and with --hold a second one ({"closed": true})
// after the client has closed. Exits non-zero with {"error": ...} on failure.
import readline from "node:readline";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const STATE_COMMAND = 'cd /tmp && export AF_TS=ts-state; sleep 300 & echo "$AGENTFLOW_SESSION $$"';
const STATE_CHECK = 'echo "$PWD ${AF_TS:-unset} $AGENTFLOW_SESSION $$"';

function parseArgs(argv) {
  const args = [...argv];
  let hold = false;
  let terminate = true;
  while (args[0] === "--hold" || args[0] === "--no-terminate") {
    if (args.shift() === "--hold") {
      hold = true;
    } else {
      terminate = false;
    }
  }
  const [flag, ...rest] = args;
  if (!["--stdio", "--http", "--sse"].includes(flag) || rest.length === 0) {
    throw new Error("usage: client.mjs [--hold] [--no-terminate] --stdio CMD [ARGS...] | --http URL | --sse URL");
  }
  return { hold, terminate, kind: flag.slice(2), rest };
}

function makeTransport(kind, rest) {
  if (kind === "stdio") {
    return new StdioClientTransport({ command: rest[0], args: rest.slice(1), stderr: "inherit" });
  }
  const token = process.env.AGENTFLOW_SANDBOX_TOKEN;
  const requestInit = token ? { headers: { Authorization: `Bearer ${token}` } } : undefined;
  if (kind === "http") {
    return new StreamableHTTPClientTransport(new URL(rest[0]), { requestInit });
  }
  return new SSEClientTransport(new URL(rest[0]), { requestInit });
}

function waitForLine() {
  return new Promise((resolve) => {
    const rl = readline.createInterface({ input: process.stdin });
    const done = () => {
      rl.close();
      resolve();
    };
    rl.once("line", done);
    rl.once("close", done);
  });
}

async function call(client, name, args) {
  const result = await client.callTool({ name, arguments: args });
  return {
    isError: result.isError ?? false,
    structuredContent: result.structuredContent ?? null,
    content: result.content,
  };
}

async function main() {
  const { hold, terminate, kind, rest } = parseArgs(process.argv.slice(2));
  const transport = makeTransport(kind, rest);
  const client = new Client({ name: "agentflow-ts-sdk-test", version: "0.0.0" });
  await client.connect(transport);

  const listed = await client.listTools();
  const out = {
    transport: kind,
    serverVersion: client.getServerVersion() ?? null,
    sessionId: transport.sessionId ?? null,
    protocolVersion: transport.protocolVersion ?? null,
    tools: listed.tools.map((t) => ({ name: t.name, inputSchema: t.inputSchema })),
    hi: await call(client, "bash_run", { command: "echo hi" }),
    create: await call(client, "create_session", { resource: "bash" }),
    first: await call(client, "bash_run", { command: STATE_COMMAND }),
    second: await call(client, "bash_run", { command: STATE_CHECK }),
    unknown: await call(client, "bash_nope", { command: "true" }),
  };
  process.stdout.write(JSON.stringify(out) + "\n");

  if (hold) {
    await waitForLine();
  }
  const terminated = Boolean(terminate && transport.terminateSession && transport.sessionId);
  if (terminated) {
    await transport.terminateSession();
  }
  await client.close();
  if (hold) {
    process.stdout.write(JSON.stringify({ closed: true, terminated }) + "\n");
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stdout.write(JSON.stringify({ error: String(err?.stack ?? err) }) + "\n");
    process.exit(1);
  },
);
