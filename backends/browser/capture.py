"""Screenshots that fit in a tool result: PNG when small enough, else JPEG, else clipped."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage
from playwright.async_api import FloatRect, Locator, Page


@dataclass(frozen=True, slots=True)
class Shot:
    data: bytes
    mime_type: str
    width: int
    height: int
    note: str | None = None


def _size(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as image:  # reads the header only
        return image.size


def _shot(data: bytes, fmt: str, note: str | None = None) -> Shot:
    width, height = _size(data)
    return Shot(data, f"image/{fmt}", width, height, note)


async def capture(target: Page | Locator, *, full_page: bool, limit: int, wait: float) -> Shot:
    """A screenshot of a page (viewport or full) or of one element, at most `limit` bytes."""
    options: dict[str, Any] = {"timeout": wait * 1000}
    if isinstance(target, Page):
        options["full_page"] = full_page
    png = await target.screenshot(type="png", **options)
    if len(png) <= limit:
        return _shot(png, "png")
    jpeg = png
    for quality in (80, 60, 40):
        jpeg = await target.screenshot(type="jpeg", quality=quality, **options)
        if len(jpeg) <= limit:
            return _shot(jpeg, "jpeg", f"PNG was {len(png)} bytes; sent as JPEG quality {quality}")
    # Still too big (a very long page): keep the top part that fits.
    width, height = _size(jpeg)
    keep = max(100, int(height * limit / len(jpeg) * 0.9))
    if isinstance(target, Page):
        clip = FloatRect(x=0, y=0, width=width, height=keep)
        clipped = await target.screenshot(type="jpeg", quality=40, clip=clip, **options)
    else:  # an element larger than the limit allows: capture its top through the page
        box = await target.bounding_box()
        clip = FloatRect(x=box["x"] if box else 0, y=box["y"] if box else 0, width=width, height=keep)
        clipped = await target.page.screenshot(type="jpeg", quality=40, clip=clip, timeout=wait * 1000)
    note = f"image was {height} px high; only the top {keep} px fit in {limit} bytes"
    if len(clipped) > limit:  # a very wide page: scale down until it fits (never send more)
        clipped = _shrink(clipped, limit)
        note += "; scaled down to fit"
    return _shot(clipped, "jpeg", note)


def _shrink(data: bytes, limit: int) -> bytes:
    """Re-encode a JPEG at smaller sizes until it is at most `limit` bytes."""
    with PILImage.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    scale = 0.7
    while True:
        size = (max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale)))
        out = io.BytesIO()
        rgb.resize(size).save(out, format="JPEG", quality=40)
        if out.tell() <= limit or size == (1, 1):
            return out.getvalue()
        scale *= 0.7
