"""The browser session plays the attacker: pages try to leave the sandbox's network and file policy.

Everything is real: the sandboxed Chromium, its egress proxy, HTTP servers and raw TCP
listeners on 127.0.0.1 standing in for the server's own API and other local services.
Each attempt must fail *and* the target must never see a connection.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import pytest_asyncio

from backends.browser import BrowserBackend, seccomp
from backends.browser.proxy import EgressProxy, system_resolver
from backends.policy import Policy
from session.errors import BackendError, PermissionDenied, SessionError
from tests.backends.browser_harness import (
    Listener,
    Session,
    Site,
    make_backend,
    pids_under,
    scratch_root,
    session,
    session_setup,
)
from tests.support.polling import eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch and own network namespace need root")


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with scratch_root() as root:
        yield root


@pytest.fixture(scope="module")
def allowed() -> Iterator[Site]:
    site = Site()
    yield site
    site.close()


@pytest.fixture(scope="module")
def forbidden() -> Iterator[Site]:
    """A loopback service pages must never reach (stands in for the server's own /mcp)."""
    site = Site()
    yield site
    site.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(scratch: Path) -> AsyncIterator[BrowserBackend]:
    b = make_backend(scratch / "escape")
    await b.warmup()
    yield b
    await b.shutdown()
    assert b.launcher.pids() == []


async def fetch_result(s: Session, url: str, method: str = "POST") -> str:
    """What a page's own fetch() of `url` gives: 'ok <status>' or the error's name."""
    body = ", body: 'x'" if method == "POST" else ""
    script = f"() => fetch({url!r}, {{method: {method!r}{body}}}).then(r => 'ok ' + r.status, e => e.name)"
    return str((await s("evaluate", expression=script))["result"])


async def test_pages_cannot_reach_loopback_services(backend: BrowserBackend, allowed: Site, forbidden: Site) -> None:
    async with session(backend, allow=[allowed.allow]) as s:
        with pytest.raises(PermissionDenied, match="policy") as denied:
            await s("navigate", url=f"{forbidden.url}/health")
        assert denied.value.code == 1006
        # From a page the policy allows, the same origin's trick and its variants all fail.
        await s("navigate", url=f"{allowed.url}/next")
        port = forbidden.port
        for url in (
            f"http://127.0.0.1:{port}/mcp",
            f"http://localhost:{port}/mcp",
            f"http://[::1]:{port}/mcp",
            f"http://0.0.0.0:{port}/mcp",
            f"http://127.1:{port}/mcp",
            f"http://2130706433:{port}/mcp",
        ):
            assert not (await fetch_result(s, url)).startswith("ok"), url
        assert await fetch_result(s, f"{allowed.url}/next", "GET") == "ok 200", "the allowed site still works"
        for host in ("169.254.169.254", "10.0.0.1", "192.168.1.1", "100.64.0.1"):
            with pytest.raises(PermissionDenied):
                await s("navigate", url=f"http://{host}/latest/meta-data/")
    assert forbidden.hits == []


async def test_redirects_to_a_forbidden_port_are_refused(
    backend: BrowserBackend, allowed: Site, forbidden: Site
) -> None:
    async with session(backend, allow=[allowed.allow]) as s:
        with pytest.raises(PermissionDenied, match="policy"):
            await s("navigate", url=f"{allowed.url}/redirect?to={forbidden.url}/secret")
        await s("navigate", url=f"{allowed.url}/next")
        redirect = f"{allowed.url}/redirect?to={forbidden.url}/secret"
        assert not (await fetch_result(s, redirect, "GET")).startswith("ok")
    assert any(hit.startswith("/redirect") for hit in allowed.hits)
    assert forbidden.hits == []


async def test_websockets_to_loopback_are_refused(backend: BrowserBackend, allowed: Site) -> None:
    listener = Listener()
    try:
        async with session(backend, allow=[allowed.allow]) as s:
            await s("navigate", url=f"{allowed.url}/next")
            probe = (
                "url => new Promise(done => { const ws = new WebSocket(url);"
                " ws.onopen = () => done('open'); ws.onerror = () => done('error'); })"
            )
            for url in (f"ws://127.0.0.1:{listener.port}/", f"ws://localhost:{listener.port}/"):
                script = f"() => ({probe})({url!r})"
                assert (await s("evaluate", expression=script))["result"] == "error"
        assert listener.accepted == 0
    finally:
        listener.close()


async def test_names_resolving_to_private_addresses_are_refused(
    backend: BrowserBackend, allowed: Site, forbidden: Site
) -> None:
    """DNS rebinding: the proxy resolves names itself and checks every address it gets."""
    names = {"localtest": ["127.0.0.1"], "rebound.example": ["93.184.216.34", "127.0.0.1"]}

    async def resolver(host: str, port: int) -> list[str]:
        return names[host] if host in names else await system_resolver(host, port)

    backend.proxy.resolver = resolver
    try:
        async with session(backend, allow=[allowed.allow]) as s:
            for host in ("localhost", "localtest", "rebound.example"):
                with pytest.raises(PermissionDenied, match="private"):
                    await s("navigate", url=f"http://{host}:{forbidden.port}/")
            # A rule names an address: any name resolving to exactly that address and port passes.
            assert (await s("navigate", url=f"http://localtest:{allowed.port}/next"))["title"] == "Next"
    finally:
        backend.proxy.resolver = system_resolver
    assert forbidden.hits == []


async def test_network_none_refuses_every_request(backend: BrowserBackend, allowed: Site) -> None:
    policy = Policy(network="none", allow_private_hosts=[allowed.allow])
    hits_before = len(allowed.hits)
    async with session(backend, policy=policy) as s:
        with pytest.raises(PermissionDenied, match="network 'none'"):
            await s("navigate", url=f"{allowed.url}/next")
        assert (await s("navigate", url="data:text/html,<title>offline</title>"))["title"] == "offline"
    assert allowed.hits[hits_before:] == []


async def test_file_urls_need_the_operator_policy(backend: BrowserBackend, allowed: Site) -> None:
    async with session(backend, "plain", allow=[allowed.allow]) as s:
        with pytest.raises(PermissionDenied, match="allow_file_urls") as denied:
            await s("navigate", url="file:///etc/passwd")
        assert denied.value.code == 1006
        await s("navigate", url=f"{allowed.url}/next")
        await s("evaluate", expression="() => { location.href = 'file:///etc/passwd'; }")
        await s("wait_for", seconds=0.2)
        assert (await s("tabs"))["url"].startswith("http"), "a page cannot open file:// itself"
        other_downloads = s.state.download_dir
        (other_downloads / "secret.txt").write_text("another session's file")

        # Granted by the operator: pages see the sandbox's minimal filesystem, not the host's.
        async with session(backend, "files", policy=Policy(network="internet", allow_file_urls=True)) as f:
            await f("navigate", url="file:///etc/passwd")
            assert "root:" in (await f("get_text"))["text"]
            for path in ("/etc/shadow", "/root/", str(other_downloads / "secret.txt"), str(other_downloads)):
                with pytest.raises(BackendError, match=r"ERR_FILE_NOT_FOUND|ERR_ACCESS_DENIED"):
                    await f("navigate", url=f"file://{path}")
            # The shared browser's own directories (profile; downloads of every session land in its
            # launch dir before they are copied out) and /proc are refused for every request.
            profile = backend.launcher.profile_of(f.state.handle)
            assert profile is not None
            for path in (f"{backend.launcher.root}/", f"{profile}/", "/proc/self/environ", "/proc/1/root/etc/passwd"):
                with pytest.raises(BackendError, match="ERR_ACCESS_DENIED"):
                    await f("navigate", url=f"file://{path}")
            await f("navigate", url="file:///tmp/")  # a listing: links into private dirs fail too
            with pytest.raises(BackendError, match="ERR_ACCESS_DENIED"):
                await f("navigate", url=f"file://{profile}/../{profile.rsplit('/', 1)[1]}/Default/")


@needs_root
async def test_chromium_runs_unprivileged_with_its_own_sandbox(backend: BrowserBackend, allowed: Site) -> None:
    async with session(backend, allow=[allowed.allow]) as s:
        await s("navigate", url=f"{allowed.url}/next")
        pids = backend.launcher.pids()
        assert len(pids) > 3
        own_netns = os.readlink("/proc/self/ns/net")
        renderers = 0
        for pid in pids:
            try:
                status = await anyio.Path(f"/proc/{pid}/status").read_text()
                cmdline = await anyio.Path(f"/proc/{pid}/cmdline").read_bytes()
                netns = os.readlink(f"/proc/{pid}/ns/net")
            except OSError:
                continue  # exited meanwhile
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            uids = {int(u) for u in fields["Uid"].split()}
            assert 0 not in uids, f"pid {pid} runs as root: {cmdline[:100]!r}"
            assert b"--no-sandbox" not in cmdline
            assert fields["NoNewPrivs"].strip() == "1"
            if not cmdline.startswith(b"bwrap"):  # bwrap's own processes supervise from outside
                assert netns != own_netns, "Chromium shares the server's network namespace"
                assert fields["Seccomp"].strip() == "2", f"pid {pid} runs without a seccomp filter"
            if b"--type=renderer" in cmdline:
                renderers += 1
                assert fields["Seccomp"].strip() == "2", "a renderer runs without Chromium's seccomp sandbox"
        assert renderers >= 1


async def test_the_proxy_refuses_unknown_credentials() -> None:
    proxy = EgressProxy()
    target = Site()
    grant = proxy.grant("probe", [target.allow])
    try:
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(proxy.serve, listener)

            async def status_of(credentials: str | None, authority: str) -> int:
                head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                if credentials is not None:
                    head += f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send((head + "\r\n").encode())
                    reply = await stream.receive()
                return int(reply.split(b" ", 2)[1])

            assert await status_of(None, target.allow) == 407
            assert await status_of(f"{grant.username}:wrong", target.allow) == 407
            assert await status_of("nobody:nothing", target.allow) == 407
            assert await status_of(f"{grant.username}:{grant.password}", "127.0.0.1:1") == 403
            assert await status_of(f"{grant.username}:{grant.password}", target.allow) == 200
            proxy.revoke(grant)
            assert await status_of(f"{grant.username}:{grant.password}", target.allow) == 407
            tg.cancel_scope.cancel()
    finally:
        target.close()


async def test_a_killed_playwright_driver_is_relaunched(
    scratch: Path, allowed: Site, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await kill_the_driver_and_relaunch(scratch, allowed)
        gc.collect()  # the dead driver's objects go now, not at exit
    # Its connection's error was observed: asyncio reports no future as never retrieved.
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def kill_the_driver_and_relaunch(scratch: Path, allowed: Site) -> None:
    b = make_backend(scratch / "driver")
    try:
        await b.warmup()
        setup = session_setup(b, "old", allow=[allowed.allow])
        old = Session(b, setup, await b.initialize(setup))
        await old("navigate", url=f"{allowed.url}/next")
        (driver,) = b.launcher.live_driver_pids()
        first_browser = b.launcher.pids()
        os.kill(driver, signal.SIGKILL)

        async def unhealthy() -> bool:
            return await b.health(old.state) is not None

        await eventually(unhealthy, what="the dead browser to be noticed")
        assert "reinitialize" in (await b.health(old.state) or "").lower()
        with pytest.raises(SessionError) as caught:
            await old("snapshot")
        assert caught.value.code == 1003
        # The old Chromium dies with its driver (bwrap --die-with-parent, its own PID namespace).
        await eventually(lambda: not set(first_browser) & set(b.launcher.pids()), what="the old Chromium to die")

        async with session(b, "new", allow=[allowed.allow]) as new:
            assert (await new("navigate", url=f"{allowed.url}/next"))["title"] == "Next"
            assert b.launcher.live_driver_pids() not in ([], [driver])
        await old.close()
    finally:
        await b.shutdown()
    assert b.launcher.live_driver_pids() == []
    assert b.launcher.pids() == []
    assert pids_under(b.runtime.scratch_root) == []


@pytest.mark.skipif(not seccomp.supported(), reason="the browser's seccomp filter is written for x86_64")
async def test_the_browser_sandbox_filter_denies_escape_syscalls_but_not_user_namespaces(tmp_path: Path) -> None:
    """What code that escaped Chromium's renderer sandbox finds: no ptrace, bpf, keyrings, mounts."""
    filter_file = tmp_path / "filter.bpf"
    filter_file.write_bytes(seccomp.program())
    probe = (
        "import ctypes, json, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "out = {}\n"
        "for name, nr, args in (('ptrace', 101, (0, 0, 0, 0)), ('bpf', 321, (0, 0, 0)), ('keyctl', 250, (0, 0)),"
        " ('mount', 165, (0, 0, 0, 0, 0)), ('perf_event_open', 298, (0, 0, 0, 0, 0)), ('userfaultfd', 323, (0,))):\n"
        "    rc = libc.syscall(nr, *args)\n"
        "    out[name] = ctypes.get_errno() if rc == -1 else 0\n"
        "out['unshare_user'] = 0 if os.system('unshare -U true') == 0 else 1\n"
        "print(json.dumps(out))\n"
    )
    argv = [
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--unshare-all",
        "--die-with-parent",
        "--seccomp",
        "{fd}",
        "--",
        "/usr/bin/python3",
        "-c",
        probe,
    ]
    fd = os.open(filter_file, os.O_RDONLY)
    argv = [str(fd) if word == "{fd}" else word for word in argv]
    try:
        uid = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        result = await anyio.run_process([*uid, *argv], pass_fds=[fd], check=False)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert {k: v for k, v in outcome.items() if k != "unshare_user"} == dict.fromkeys(
        ("ptrace", "bpf", "keyctl", "mount", "perf_event_open", "userfaultfd"), 1
    ), outcome  # errno 1 = EPERM
    assert outcome["unshare_user"] == 0, "Chromium's own sandbox needs new user namespaces"
