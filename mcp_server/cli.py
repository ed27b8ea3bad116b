"""`agentflow-sandbox`: serve, validate a manifest, list tools."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from backends.processes import sweep_orphan_dirs, sweep_orphans
from backends.sandbox import sweep_orphans as sweep_sandbox_orphans
from manifests import build_backends, load_manifest
from manifests.schema import Manifest
from mcp_server.app import build_server, tool_listing
from mcp_server.factory import engine_from_manifest, executor_from_manifest
from mcp_server.tokens import TokenSource, resolve_credentials
from mcp_server.transports import (
    MCP_PATH,
    SSE_PATH,
    HttpListener,
    HttpOptions,
    http_backend_options,
    serve_http,
    serve_stdio,
)
from session.engine import Engine
from session.errors import ConfigurationError

log = logging.getLogger("agentflow_sandbox")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentflow-sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the MCP server")
    serve.add_argument("--transport", choices=["stdio", "sse", "http"], help="default: the manifest's (stdio)")
    serve.add_argument("--manifest", help="JSON or TOML manifest (default: the packaged default.toml)")
    serve.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 18890)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where sessions live: in this process (local, the default) or on a Ray cluster (ray)",
    )
    serve.add_argument("--ray-address", help="the Ray cluster to join with --executor ray (e.g. 10.0.0.5:6379)")
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="HTTP/SSE without bearer tokens (only on a loopback address; every caller is one principal)",
    )
    validate = sub.add_parser("validate", help="check a manifest and the backends it names")
    validate.add_argument("--manifest")
    tools = sub.add_parser("tools", help="list the MCP tools a manifest gives, with their schemas")
    tools.add_argument("--manifest")
    tools.add_argument("--json", action="store_true", help="full JSON (name, description, input schema)")
    return parser


def cli_logic(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        if args.command == "validate":
            backends = build_backends(manifest)
            summary = ", ".join(f"{n} ({b.kind().value}, {len(b.tools())} tools)" for n, b in backends.items())
            sys.stdout.write(f"manifest OK: {summary}; session_ttl={manifest.server.session_ttl:g}s\n")
            return 0
        if args.command == "tools":
            return _list_tools(manifest, as_json=args.json)
        return _serve(manifest, args)
    except ConfigurationError as exc:
        sys.stderr.write(f"agentflow-sandbox: configuration error: {exc.message}\n")
        return 2


def _list_tools(manifest: Manifest, *, as_json: bool) -> int:
    tools = tool_listing(engine_from_manifest(manifest))
    if as_json:
        payload: list[dict[str, Any]] = [
            tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools
        ]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        for tool in tools:
            params = ", ".join((tool.input_schema or {}).get("properties", {}))
            first_line = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", tool.description or "")[0]
            sys.stdout.write(f"{tool.name}({params})\n    {first_line}\n")
    return 0


def _serve(manifest: Manifest, args: argparse.Namespace) -> int:
    if args.executor or args.ray_address:
        server = manifest.server.model_copy(
            update={
                "executor": args.executor or manifest.server.executor,
                "ray_address": args.ray_address or manifest.server.ray_address,
            }
        )
        manifest = manifest.model_copy(update={"server": server})
    settings = manifest.server
    transport = args.transport or settings.transport
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    level = args.log_level or settings.log_level
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listener: HttpListener | None = None
    options: HttpOptions | None = None
    if transport != "stdio":
        credentials = None if args.no_auth else resolve_credentials(settings.token_map())
        if settings.executor == "ray" and credentials is not None and credentials.source is TokenSource.GENERATED:
            raise ConfigurationError(
                "--executor ray needs configured tokens (AGENTFLOW_SANDBOX_TOKEN or server.tokens): a token "
                "generated by one front end would not open the sessions through the others"
            )
        options = HttpOptions(
            tokens=None if credentials is None else credentials.tokens,
            token_source=None if credentials is None else credentials.source,
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
        )
    engine = executor_from_manifest(manifest)
    if settings.executor == "ray":
        return _run(engine, None if options is None else HttpListener.open(host, port, options), host, level)
    # Sandboxes first: a dead server's session homes are mounts inside its scratch directory,
    # and its sessions' processes are found by cgroup and uid (they may have dropped every tag).
    anyio.run(sweep_sandbox_orphans)
    orphans, dirs = sweep_orphans(), sweep_orphan_dirs()
    if orphans or dirs:
        log.warning(
            "cleaned up after a server that died without doing so: %d processes, %d directories",
            len(orphans),
            len(dirs),
        )
    if options is not None:
        listener = HttpListener.open(host, port, options)
    return _run(engine, listener, host, level)


def _run(engine: Engine, listener: HttpListener | None, host: str, level: str) -> int:
    async def run() -> None:
        async with engine:
            server = build_server(engine)
            if listener is None:
                await serve_stdio(engine, server)
            else:
                url = f"http://{f'[{host}]' if ':' in host else host}:{listener.port}"
                log.info("serving MCP on %s%s (streamable HTTP) and %s%s (SSE)", url, MCP_PATH, url, SSE_PATH)
                await serve_http(engine, server, listener=listener, log_level=level)

    try:
        anyio.run(run, backend_options={} if listener is None else http_backend_options())
    finally:
        if listener is not None:
            listener.close()
    return 0


def main() -> None:
    sys.exit(cli_logic())
