"""The HTTP edge: /health floor, explicit `bash_run ':'` with the official client, server CPU per call.

Run: python bench/bench_http_edge.py [--n 300] [--baseline /work/main]   (prints; asserts nothing)

With `--baseline DIR` a second server is started from that checkout (with its own .venv) and
the two are measured interleaved, round by round, so both see the same machine load.
Server CPU per call is the server process's user+system time over the calls it served.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import loop_ms, measure, percentile, pipe_round_trip_us, running_server  # noqa: E402
from mcp_server.tokens import read_token_file  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

WORKER_KEY = "agentflow/worker_id"
MODERN = "2026-07-28"


@dataclass
class Target:
    label: str
    url: str
    pid: int
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def cpu(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system


@contextmanager
def server_from(root: Path, label: str) -> Iterator[Target]:
    """`serve --transport http` from checkout `root`, with that checkout's venv interpreter."""
    python = root / ".venv" / "bin" / "python"
    port = free_port()
    argv = [str(python if python.exists() else sys.executable), "-m", "mcp_server", "serve"]
    argv += ["--transport", "http", "--port", str(port), "--log-level", "WARNING"]
    # A loaded machine can take long to import and sweep: 90 s.
    with running_server(argv, port, within=90, what=f"server from {root}", cwd=root) as proc:
        token = read_token_file(port)
        assert token, "the server wrote no token file"
        yield Target(label, f"http://127.0.0.1:{port}/mcp", proc.pid, token)


def calibration() -> str:
    return (
        f"calibration: 1M-iteration loop {loop_ms():.1f} ms; "
        f"pipe round trip to cat p50 {pipe_round_trip_us() / 1000:.4f} ms"
    )


async def health(target: Target, n: int) -> list[float]:
    async with httpx2.AsyncClient() as http:
        url = target.url.removesuffix("/mcp") + "/health"
        return await measure(lambda: http.get(url), n, warmup=20)


async def official_client(target: Target, stack: AsyncExitStack, mode: str) -> tuple[Client, dict[str, Any]]:
    http = await stack.enter_async_context(httpx2.AsyncClient(headers=target.headers, timeout=60.0))
    client = await stack.enter_async_context(Client(streamable_http_client(target.url, http_client=http), mode=mode))
    meta = {WORKER_KEY: uuid.uuid4().hex}
    created = await client.call_tool("create_session", {"resource": "bash"}, meta=meta)  # type: ignore[arg-type]
    assert not created.is_error, created
    return client, meta


async def light_calls(target: Target, n: int) -> tuple[list[float], float]:
    """Plain JSON POSTs at 2026-07-28 with httpx2 on one keep-alive connection (a light client)."""
    key = uuid.uuid4().hex
    headers = {
        **target.headers,
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
    }
    async with httpx2.AsyncClient(headers=headers, timeout=60.0) as http:

        async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            response = await http.post(
                target.url, content=_raw_body(1, name, arguments, key), headers={"Mcp-Name": name}
            )
            result: dict[str, Any] = response.json()["result"]
            assert not result["isError"], result
            return result

        await call("create_session", {"resource": "bash"})
        await measure(lambda: call("bash_run", {"command": ":"}), 0, warmup=20)
        cpu0 = target.cpu()
        samples = await measure(lambda: call("bash_run", {"command": ":"}), n, warmup=0)
        cpu_ms = (target.cpu() - cpu0) * 1000 / n
        await call("destroy_session", {})
    return samples, cpu_ms


async def sequential_calls(target: Target, n: int, mode: str) -> tuple[list[float], float]:
    async with AsyncExitStack() as stack:
        client, meta = await official_client(target, stack, mode)

        async def call() -> None:
            result = await client.call_tool("bash_run", {"command": ":"}, meta=meta)  # type: ignore[arg-type]
            assert not result.is_error, result

        await measure(call, 0, warmup=20)
        cpu0 = target.cpu()
        samples = await measure(call, n, warmup=0)
        cpu_ms = (target.cpu() - cpu0) * 1000 / n
        await client.call_tool("destroy_session", {}, meta=meta)  # type: ignore[arg-type]
    return samples, cpu_ms


async def concurrent_official(target: Target, workers: int, calls: int) -> tuple[float, list[float], float]:
    latencies: list[float] = []
    async with AsyncExitStack() as stack:
        clients = [await official_client(target, stack, "auto") for _ in range(workers)]

        async def worker(client: Client, meta: dict[str, Any], calls: int, samples: list[float]) -> None:
            for _ in range(calls):
                t0 = time.perf_counter()
                result = await client.call_tool("bash_run", {"command": ":"}, meta=meta)  # type: ignore[arg-type]
                samples.append((time.perf_counter() - t0) * 1000)
                assert not result.is_error, result

        async with anyio.create_task_group() as tg:  # warm-up: sessions settled, code paths hot
            for client, meta in clients:
                tg.start_soon(worker, client, meta, 2, [])
        cpu0, t0 = target.cpu(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for client, meta in clients:
                tg.start_soon(worker, client, meta, calls, latencies)
        elapsed, cpu = time.perf_counter() - t0, target.cpu() - cpu0
        for client, meta in clients:
            await client.call_tool("destroy_session", {}, meta=meta)  # type: ignore[arg-type]
    total = workers * calls
    return total / elapsed, latencies, cpu * 1000 / total


def _raw_body(request_id: int, name: str, arguments: dict[str, Any], worker: str) -> bytes:
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        WORKER_KEY: worker,
    }
    params = {"name": name, "arguments": arguments, "_meta": meta}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


async def concurrent_raw(target: Target, workers: int, calls: int) -> tuple[float, list[float], float]:
    """Plain JSON POSTs at 2026-07-28 over one keep-alive socket per worker: the load generator
    costs little CPU, so this shows what the server can sustain."""
    port = int(target.url.split(":")[2].split("/")[0])
    latencies: list[float] = []
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {target.token}\r\n"
        f"Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
        f"MCP-Protocol-Version: {MODERN}\r\nMcp-Method: tools/call\r\nMcp-Name: {{name}}\r\n"
        "Content-Length: {length}\r\n\r\n"
    )

    async def exchange(stream: anyio.abc.SocketStream, buffer: bytearray, name: str, body: bytes) -> dict[str, Any]:
        await stream.send(head.format(name=name, length=len(body)).encode() + body)
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive()
        header_end = buffer.index(b"\r\n\r\n") + 4
        headers = bytes(buffer[:header_end]).lower()
        start = headers.index(b"content-length:") + len(b"content-length:")
        length = int(headers[start : headers.index(b"\r\n", start)])
        while len(buffer) < header_end + length:
            buffer += await stream.receive()
        payload = bytes(buffer[header_end : header_end + length])
        del buffer[: header_end + length]
        return json.loads(payload)

    streams = []
    keys = [uuid.uuid4().hex for _ in range(workers)]
    for key in keys:
        # Connected just before use: an idle new connection is closed at the server's header deadline.
        stream = await anyio.connect_tcp("127.0.0.1", port)
        streams.append(stream)
        body = _raw_body(1, "create_session", {"resource": "bash"}, key)
        reply = await exchange(stream, bytearray(), "create_session", body)
        assert not reply["result"]["isError"], reply

    async def worker(stream: anyio.abc.SocketStream, key: str, calls: int, samples: list[float]) -> None:
        buffer = bytearray()
        body = _raw_body(2, "bash_run", {"command": ":"}, key)
        for _ in range(calls):
            t0 = time.perf_counter()
            reply = await exchange(stream, buffer, "bash_run", body)
            samples.append((time.perf_counter() - t0) * 1000)
            assert not reply["result"]["isError"], reply

    async with anyio.create_task_group() as tg:  # warm-up: sessions settled, code paths hot
        for stream, key in zip(streams, keys, strict=True):
            tg.start_soon(worker, stream, key, 5, [])
    cpu0, t0 = target.cpu(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for stream, key in zip(streams, keys, strict=True):
            tg.start_soon(worker, stream, key, calls, latencies)
    elapsed, cpu = time.perf_counter() - t0, target.cpu() - cpu0
    for stream, key in zip(streams, keys, strict=True):
        await exchange(stream, bytearray(), "destroy_session", _raw_body(3, "destroy_session", {}, key))
        await stream.aclose()
    total = workers * calls
    return total / elapsed, latencies, cpu * 1000 / total


async def measure_round(target: Target, n: int, workers: int, calls: int, raw_calls: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    figures["health_p50"] = statistics.median(await health(target, n))
    for mode in ("auto", "legacy"):
        samples, cpu = await sequential_calls(target, n, mode)
        figures[f"{mode}_p50"] = statistics.median(samples)
        figures[f"{mode}_cpu"] = cpu
    samples, cpu = await light_calls(target, n)
    figures["light_p50"], figures["light_cpu"] = statistics.median(samples), cpu
    rate, lat, cpu = await concurrent_official(target, workers, calls)
    figures.update(official_rate=rate, official_p50=statistics.median(lat), official_p95=percentile(lat, 0.95))
    figures["official_cpu"] = cpu
    rate, lat, cpu = await concurrent_raw(target, workers, raw_calls)
    figures.update(raw_rate=rate, raw_p50=statistics.median(lat), raw_p95=percentile(lat, 0.95), raw_cpu=cpu)
    return figures


def report(label: str, rounds: list[dict[str, float]], workers: int, calls: int, raw_calls: int) -> None:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    out = sys.stdout.write
    out(f"\n== {label} (median of {len(rounds)} rounds) ==\n")
    out(f"GET /health p50                                   {med('health_p50'):7.3f} ms\n")
    for mode, name in (
        ("auto", "official client, 2026-07-28 (auto)"),
        ("legacy", "official client, handshake (legacy)"),
        ("light", "plain JSON POSTs (httpx2), 2026-07-28"),
    ):
        ratio = med(f"{mode}_p50") / med("health_p50")
        out(
            f"{name:<40} bash_run ':' p50 {med(f'{mode}_p50'):7.3f} ms ({ratio:.2f}x /health)"
            f"   server CPU {med(f'{mode}_cpu'):.3f} ms/call\n"
        )
    out(
        f"official client, {workers} workers x {calls}:          {med('official_rate'):7.0f} calls/s  "
        f"p50 {med('official_p50'):.1f} ms  p95 {med('official_p95'):.1f} ms   "
        f"server CPU {med('official_cpu'):.3f} ms/call\n"
    )
    out(
        f"raw JSON POSTs,  {workers} workers x {raw_calls}:          {med('raw_rate'):7.0f} calls/s  "
        f"p50 {med('raw_p50'):.1f} ms  p95 {med('raw_p95'):.1f} ms   server CPU {med('raw_cpu'):.3f} ms/call\n"
    )


async def main(args: argparse.Namespace, baseline: Path | None) -> None:
    sys.stdout.write(calibration() + "\n")
    with ExitStack() as stack:
        targets = [stack.enter_context(server_from(ROOT, f"this tree ({ROOT.name})"))]
        if baseline is not None:
            targets.insert(0, stack.enter_context(server_from(baseline, f"baseline ({baseline})")))
        rounds: dict[str, list[dict[str, float]]] = {t.label: [] for t in targets}
        for r in range(args.rounds):
            for target in targets if r % 2 == 0 else reversed(targets):
                figures = await measure_round(target, args.n, args.workers, args.calls, args.raw_calls)
                rounds[target.label].append(figures)
        for target in targets:
            report(target.label, rounds[target.label], args.workers, args.calls, args.raw_calls)
    sys.stdout.write(calibration() + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300, help="sequential calls per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--calls", type=int, default=10, help="calls per worker, official client")
    parser.add_argument("--raw-calls", type=int, default=40, help="calls per worker, raw JSON POSTs")
    parser.add_argument("--baseline", help="another checkout to measure beside this one (e.g. /work/main)")
    arguments = parser.parse_args()
    anyio.run(main, arguments, Path(arguments.baseline).resolve() if arguments.baseline else None)
