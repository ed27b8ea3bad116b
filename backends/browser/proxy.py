"""The egress proxy every page request of the shared Chromium goes through.

Threat: a page (or a prompt-injected model) steering the browser at the server's own API,
at other loopback or private services, or at cloud metadata (169.254.169.254). Chromium
is started with `--proxy-server` pointing here and each session's context gets its own
proxy credentials, so the proxy knows whose policy applies. For every request it:

- authenticates the context (unknown or missing credentials get 407; no request passes);
- resolves the host itself and checks *every* address it resolves to (a public name that
  resolves to 127.0.0.1, i.e. DNS rebinding, is refused), then connects to the checked
  address, never re-resolving;
- refuses loopback, link-local, private (RFC 1918, CGNAT, ULA), unspecified, multicast and
  reserved addresses unless the session's `policy.allow_private_hosts` lists them.

Plain HTTP (absolute-form requests) and CONNECT (HTTPS, WebSockets) are both handled;
redirects arrive as new requests and are checked like any other. Each plain HTTP
request gets its own upstream connection (`Connection: close`), so a kept-alive
connection cannot carry a second request to a host that was never checked.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_HEAD = 64 * 1024
CONNECT_TIMEOUT = 15.0
#: A connection that has not sent its request head by then is dropped.
HEAD_TIMEOUT = 60.0
REALM = "agentflow-browser"
#: Header on the proxy's own answers, so a tool can tell them from the origin's.
MARK = "X-Agentflow-Proxy"


class Refused(Exception):
    """A request the policy does not allow (the message says why, for the page and the model)."""


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, /etc/hosts included)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: Address) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One `allow_private_hosts` entry: a host name, an address or a network, optionally a port."""

    name: str | None = None
    network: Network | None = None
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> AllowRule:
        """Read 'host', 'host:port', '10.0.0.0/8', '127.0.0.1:8080', '[::1]:8080' or '::1'.

        Raises:
            ValueError: the entry is none of these.
        """
        text = entry.strip().lower()
        port: int | None = None
        if text.startswith("["):
            inner, _, rest = text[1:].partition("]")
            text = inner
            if rest.startswith(":"):
                port = int(rest[1:])
        elif text.count(":") == 1:
            text, _, port_text = text.partition(":")
            port = int(port_text)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port out of range in {entry!r}")
        try:
            return cls(network=ipaddress.ip_network(text, strict=False), port=port)
        except ValueError:
            pass
        if not text or any(c in text for c in "/ ") or text.startswith("."):
            raise ValueError(f"not a host, address or network: {entry!r}")
        return cls(name=text.rstrip("."), port=port)

    def allows(self, host: str, address: Address, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.name is not None:
            return self.name == host.lower().rstrip(".")
        assert self.network is not None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.version == self.network.version and address in self.network


@dataclass(slots=True)
class Grant:
    """One context's proxy account: its credentials and the private hosts its policy allows."""

    label: str
    username: str
    password: str
    rules: tuple[AllowRule, ...]
    network: str = "internet"
    refusals: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    refused: int = 0
    failures: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    failed: int = 0

    def check(self, host: str, addresses: Iterable[str], port: int) -> None:
        """Raise `Refused` unless every address is public or allowed by a rule.

        Network `none` refuses everything; `host` (the operator's explicit choice) allows
        private addresses too; `internet` allows public ones and the listed private ones.
        """
        if self.network == "none":
            raise Refused("this session's policy has network 'none': pages cannot reach any host")
        if self.network == "host":
            return
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if is_public(address):
                continue
            if any(rule.allows(host, address, port) for rule in self.rules):
                continue
            shown = host if host == text else f"{host} ({text})"
            raise Refused(
                f"{shown}:{port} is a loopback, private or link-local address; the session's policy does not "
                "allow it (the operator can list it in policy.allow_private_hosts)"
            )


def parse_rules(entries: Iterable[str]) -> tuple[AllowRule, ...]:
    """The rules of `allow_private_hosts` (malformed entries raise ValueError naming them)."""
    return tuple(AllowRule.parse(e) for e in entries)


class EgressProxy:
    """An HTTP proxy (plain and CONNECT) enforcing each context's network policy.

    `serve(listener)` accepts on any number of listeners (the host's loopback, or a
    socket made inside the browser sandbox's own network namespace).
    """

    def __init__(self, resolver: Resolver = system_resolver) -> None:
        self.resolver = resolver
        self._grants: dict[str, Grant] = {}

    # -- accounts --------------------------------------------------------------------

    def grant(self, label: str, allow_private_hosts: Iterable[str], network: str = "internet") -> Grant:
        """A fresh account for one context (random credentials, never logged).

        Raises:
            ValueError: an `allow_private_hosts` entry is malformed.
        """
        grant = Grant(
            label=label,
            username=f"s{secrets.token_hex(8)}",
            password=secrets.token_urlsafe(24),
            rules=parse_rules(allow_private_hosts),
            network=network,
        )
        self._grants[grant.username] = grant
        return grant

    def revoke(self, grant: Grant) -> None:
        self._grants.pop(grant.username, None)

    def _authenticate(self, headers: dict[str, str]) -> Grant | None:
        value = headers.get("proxy-authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            username, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        grant = self._grants.get(username)
        if grant is None or not secrets.compare_digest(grant.password, password):
            return None
        return grant

    # -- serving ---------------------------------------------------------------------

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """Accept and serve connections until cancelled."""
        await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                await self._handle_request(client)
            except (
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                TimeoutError,
            ):
                pass
            except anyio.DelimiterNotFound:
                await _reply(client, 431, "request head too large")
            except OSError as exc:
                log.debug("proxy connection failed: %s", exc)

    async def _handle_request(self, client: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(client)
        with anyio.fail_after(HEAD_TIMEOUT):
            head = await reader.receive_until(b"\r\n\r\n", MAX_HEAD)
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            await _reply(client, 400, "malformed request line")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        grant = self._authenticate(headers)
        if grant is None:
            await _reply(client, 407, "proxy authentication required", {"Proxy-Authenticate": f'Basic realm="{REALM}"'})
            return
        host, port = target[:200], 0
        try:
            if method.upper() == "CONNECT":
                host, port = _split_authority(target, 443)
            else:
                parts = urlsplit(target)
                if parts.scheme.lower() != "http" or not parts.hostname:
                    raise Refused(f"only http:// URLs and CONNECT go through this proxy, not {target[:100]!r}")
                host, port = parts.hostname, parts.port or 80
            upstream = await self._connect(grant, host, port)
        except Refused as exc:
            grant.refusals.append(str(exc))
            grant.refused += 1
            log.info("browser egress refused for session %s: %s", grant.label, exc)
            await _reply(client, 403, f"refused by the sandbox's network policy: {exc}", {MARK: "refused"})
            return
        except OSError as exc:
            message = f"cannot reach {host}:{port}: {exc.strerror or exc}"
            grant.failures.append(message)
            grant.failed += 1
            await _reply(client, 502, message, {MARK: "unreachable"})
            return
        async with upstream:
            if method.upper() == "CONNECT":
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                await upstream.send(_origin_request(method, target, version, lines[1:]))
            leftover = reader.buffer
            if leftover:
                await upstream.send(bytes(leftover))
            await _pipe(client, upstream)

    async def _connect(self, grant: Grant, host: str, port: int) -> anyio.abc.SocketStream:
        try:
            literal = ipaddress.ip_address(host)
            addresses = [str(literal)]
        except ValueError:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                raise Refused(f"{host} does not resolve ({exc.strerror or exc})") from None
        if not addresses:
            raise Refused(f"{host} does not resolve")
        grant.check(host, addresses, port)
        last: OSError | None = None
        for address in addresses:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    return await anyio.connect_tcp(address, port)
            except TimeoutError:
                last = OSError(f"timed out connecting to {address}")
            except OSError as exc:
                # anyio wraps the real error ("Connection refused") as the cause.
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                reason = os.strerror(cause.errno) if cause.errno else str(cause)
                last = OSError(cause.errno, reason.lower())
        raise last or OSError("no address to connect to")


def _split_authority(target: str, default_port: int) -> tuple[str, int]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    host, _, port_text = target.rpartition(":")
    if not host:
        return target, default_port
    try:
        return host, int(port_text)
    except ValueError:
        raise Refused(f"bad CONNECT target {target[:100]!r}") from None


_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


def _origin_request(method: str, target: str, version: str, header_lines: list[str]) -> bytes:
    """The request as the origin server expects it: path only, no proxy headers, one request."""
    parts = urlsplit(target)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    kept = [line for line in header_lines if line and line.partition(":")[0].strip().lower() not in _HOP_HEADERS]
    return "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1")


async def _pipe(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
    async def copy(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
        try:
            async for chunk in src:
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await dst.send_eof()

    async with anyio.create_task_group() as tg:
        tg.start_soon(copy, a, b)
        tg.start_soon(copy, b, a)


async def _reply(
    client: anyio.abc.SocketStream, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        407: "Proxy Authentication Required",
        431: "Too Large",
        502: "Bad Gateway",
    }
    body = (message + "\n").encode()
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await client.send("\r\n".join(lines).encode() + body)
