"""Turning Playwright's exceptions into the sandbox's coded errors, with a hint for the model."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from backends.browser.snapshot import STALE_HINT
from session.errors import BackendError, ExecutionTimeout, ParameterError, SandboxError, SessionError

_CLOSED = (
    "has been closed",
    "target closed",
    "browser closed",
    "connection closed",
    "browser has disconnected",
)
_BAD_SELECTOR = (
    "unexpected token",
    "is not a valid selector",
    "unknown engine",
    "selector engine",
    "parsing",
)
_NET_HINTS = {
    "ERR_NAME_NOT_RESOLVED": "the host name does not resolve",
    "ERR_CONNECTION_REFUSED": "nothing is listening at that address",
    "ERR_CONNECTION_RESET": "the server reset the connection",
    "ERR_CONNECTION_TIMED_OUT": "the server did not answer",
    "ERR_ADDRESS_UNREACHABLE": "the address is unreachable",
    "ERR_INTERNET_DISCONNECTED": "there is no network",
    "ERR_BLOCKED_BY_CLIENT": "the URL matches the session's `block` patterns",
    "ERR_CERT": "the TLS certificate is invalid (set ignore_https_errors to accept it)",
    "ERR_UNSAFE_PORT": "Chromium refuses to connect to that port",
    "ERR_ABORTED": "the navigation was aborted (a download, or another navigation replaced it)",
    "ERR_TUNNEL_CONNECTION_FAILED": "the sandbox's egress proxy refused or could not reach that address",
}


def first_line(message: str) -> str:
    """The message without Playwright's `Api.method:` prefix and call log."""
    line = (message or "").strip().splitlines()[0] if message and message.strip() else "unknown error"
    line = re.sub(r"^[A-Z][A-Za-z]*\.[a-z_A-Z]+: ", "", line)
    return line if len(line) <= 300 else line[:300] + "..."


@contextlib.asynccontextmanager
async def translated(action: str, wait: float | None = None) -> AsyncIterator[None]:
    """Run a Playwright call, re-raising its failure as the matching `SandboxError`."""
    try:
        yield
    except SandboxError:
        raise
    except PlaywrightTimeoutError as exc:
        if "action done" in exc.message and "waiting for scheduled navigations" in exc.message:
            # The click/press happened; only the navigation it started is slow. Not a failure:
            # the caller reports where the page is now (and the model can wait_for more).
            return
        limit = f" after {wait:g} s" if wait else ""
        raise ExecutionTimeout(
            f"{action} timed out{limit}: the element was not found, not visible or not enabled, or the page "
            f"is still loading. Wait, use wait_for, or {STALE_HINT}"
        ) from exc
    except PlaywrightError as exc:
        raise classify(action, exc) from exc


def classify(action: str, exc: PlaywrightError) -> SandboxError:
    """The coded error for a Playwright error raised while doing `action`."""
    message = exc.message or str(exc)
    line = first_line(message)
    lowered = message.lower()
    if any(marker in lowered for marker in _CLOSED):
        return SessionError(
            f"{action} failed because the tab or browser context is gone ({line}); "
            "if this keeps happening, destroy the browser session and create a new one"
        )
    if "strict mode violation" in lowered:
        count = re.search(r"resolved to (\d+) elements", message)
        many = f"{count.group(1)} elements" if count else "several elements"
        return ParameterError(f"{action}: the selector matches {many}; use a more specific selector or a ref")
    if "unknown key" in lowered:
        return ParameterError(f"{action}: {line}; use names like 'Enter', 'Tab', 'ArrowDown', 'Control+A'")
    if any(marker in lowered for marker in _BAD_SELECTOR) and "selector" in lowered:
        return ParameterError(f"{action}: invalid selector ({line})")
    if "net::" in message:
        code = re.search(r"net::(ERR_[A-Z_]+)", message)
        hint = next((h for k, h in _NET_HINTS.items() if code and code.group(1).startswith(k)), None)
        return BackendError(f"{action} failed: {line}" + (f" ({hint})" if hint else ""))
    return BackendError(f"{action} failed: {line}")
