"""Accessibility snapshots with element refs, and turning a ref back into an element.

The snapshot is Playwright's AI-mode ARIA snapshot: a YAML-like tree of roles and
accessible names where elements carry refs such as `e12` (`f1e3` inside the first
iframe). Playwright keeps an element's ref while the element lives and keeps its role
and name, so refs stay valid across snapshots until the page changes; the ref map lives
in Playwright's isolated world, where page scripts cannot forge or move it.

We make the tree more compact for a model to read: anonymous `generic` wrappers (divs
with no name, no text and no pointer cursor) are dropped and their children lifted.
"""

from __future__ import annotations

import re

from playwright.async_api import Locator, Page

from session.errors import ParameterError

REF_RE = re.compile(r"^(f\d+)?e\d+$")
_WRAPPER_RE = re.compile(r"^- generic(?: \[active\])?(?: \[ref=[\w]+\])?:?$")
STALE_HINT = "take a new snapshot to get current refs"


def compact(snapshot: str) -> str:
    """Drop anonymous `generic` wrapper lines, lifting their children one level."""
    out: list[str] = []
    dropped: list[int] = []  # indents of the wrappers whose subtree we are inside
    for line in snapshot.splitlines():
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        while dropped and dropped[-1] >= indent:
            dropped.pop()
        if _WRAPPER_RE.match(body):
            dropped.append(indent)
            continue
        shift = 2 * len(dropped)
        out.append(" " * max(0, indent - shift) + body)
    return "\n".join(out)


def bounded(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut at a line boundary to at most `max_chars`, and whether it was cut."""
    if len(text) <= max_chars:
        return text, False
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars], True


async def take(page: Page, root: Locator | None, max_chars: int) -> tuple[str, bool]:
    """The compact snapshot of `page` (or of the subtree at `root`), bounded."""
    raw = await (root or page).aria_snapshot(mode="ai")
    return bounded(compact(raw), max_chars)


async def locate(page: Page, ref: str | None, selector: str | None) -> Locator:
    """The element a tool call points at, by snapshot ref or CSS/Playwright selector.

    Raises:
        ParameterError: neither given, a malformed ref, or a ref not on the current page.
    """
    if ref:
        ref = ref.strip().removeprefix("ref=").strip("[]")
        if not REF_RE.match(ref):
            raise ParameterError(f"'{ref}' is not a ref; refs look like 'e12' and come from the snapshot tool")
        locator = page.locator(f"aria-ref={ref}")
        if await locator.count() == 0:
            raise ParameterError(
                f"ref {ref} is not on the current page (the page changed, or the ref came from another tab "
                f"or an older snapshot); {STALE_HINT}"
            )
        return locator
    if selector:
        return page.locator(selector)
    raise ParameterError("say which element: pass `ref` (from snapshot) or `selector`")
