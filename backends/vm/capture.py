"""Screenshots (X GetImage + Pillow PNG) and the mapping between screen and model coordinates.

A session may ask for screenshots scaled down to fit a maximum size (`scale_to`), as
computer-use models expect; `Geometry` maps the model's coordinates back to the
screen and checks they are on it.
"""

from __future__ import annotations

import array
import io
import logging
from dataclasses import dataclass
from typing import cast

from PIL import Image as PILImage
from Xlib import display as xdisplay

from backends.vm.xconnect import XEndpoint
from backends.vm.xgrab import RootGrabber
from session.errors import BackendError, ParameterError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Screen size, and the size screenshots are shown at (equal unless scaled)."""

    screen_width: int
    screen_height: int
    width: int
    height: int

    @classmethod
    def fit(cls, screen: tuple[int, int], scale_to: tuple[int, int] | None) -> Geometry:
        """Shown size: the screen scaled down (never up) to fit `scale_to`, aspect kept."""
        sw, sh = screen
        if scale_to is None:
            return cls(sw, sh, sw, sh)
        factor = min(scale_to[0] / sw, scale_to[1] / sh, 1.0)
        return cls(sw, sh, max(1, round(sw * factor)), max(1, round(sh * factor)))

    @property
    def scaled(self) -> bool:
        return (self.width, self.height) != (self.screen_width, self.screen_height)

    @property
    def scale(self) -> float:
        """Shown pixels per screen pixel (1.0 when not scaled)."""
        return self.width / self.screen_width

    def to_screen(self, x: int, y: int) -> tuple[int, int]:
        """Model (screenshot) coordinates to screen coordinates.

        Raises:
            ParameterError: the point lies outside the screenshot.
        """
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise ParameterError(self._off_screen(x, y))
        if not self.scaled:
            return x, y
        sx = min(self.screen_width - 1, int((x + 0.5) * self.screen_width / self.width))
        sy = min(self.screen_height - 1, int((y + 0.5) * self.screen_height / self.height))
        return sx, sy

    def to_model(self, x: int, y: int) -> tuple[int, int]:
        """Screen coordinates to model (screenshot) coordinates."""
        if not self.scaled:
            return x, y
        mx = min(self.width - 1, int((x + 0.5) * self.width / self.screen_width))
        my = min(self.height - 1, int((y + 0.5) * self.height / self.screen_height))
        return mx, my

    def _off_screen(self, x: int, y: int) -> str:
        size = f"{self.width}x{self.height}"
        text = (
            f"point ({x}, {y}) is outside the screen, which is {size}: "
            f"x must be 0..{self.width - 1} and y 0..{self.height - 1}"
        )
        if self.scaled:
            text += (
                f" (coordinates are in screenshot pixels; the real screen is {self.screen_width}x{self.screen_height})"
            )
        return text


class ScreenCapture:
    """Grabs one desktop's screen and draws the pointer in if asked.

    Pixels come over a connection of their own (`RootGrabber`: core GetImage, which needs
    no shared memory, so it works across a sandbox's IPC namespace); the pointer image
    comes from XFIXES on the session's python-xlib connection.
    """

    def __init__(self, endpoint: XEndpoint, display: xdisplay.Display, *, with_cursor: bool = False) -> None:
        self.display = display
        self.root = display.screen().root
        self.with_cursor = with_cursor and display.has_extension("XFIXES")
        if self.with_cursor:
            display.xfixes_query_version()  # the extension answers nothing before this
        self._grabber = RootGrabber(endpoint)

    @property
    def method(self) -> str:
        """How pixels are read: 'mit-shm' (shared memory) or 'getimage' (copied over the socket)."""
        return "mit-shm" if self._grabber.shared_memory else "getimage"

    def close(self) -> None:
        self._grabber.close()

    def grab(self, geometry: Geometry) -> PILImage.Image:
        """The whole screen as an RGB image, scaled to the shown size.

        Raises:
            BackendError: the screen's pixel format is not 24-bit colour in 32-bit pixels.
        """
        size = (geometry.screen_width, geometry.screen_height)
        data = self._grabber.grab(*size)
        if len(data) != size[0] * size[1] * 4:
            raise BackendError(f"unsupported screen format (depth {self._grabber.depth}, {len(data)} bytes)")
        # Unpacking BGRX into RGB copies, so shared memory the next grab reuses is not kept.
        image = PILImage.frombuffer("RGB", size, cast(bytes, data), "raw", "BGRX", 0, 1)
        if self.with_cursor:
            self._draw_cursor(image)
        if geometry.scaled:
            image = image.resize((geometry.width, geometry.height), PILImage.Resampling.LANCZOS, reducing_gap=2.0)
        return image

    def _draw_cursor(self, image: PILImage.Image) -> None:
        cursor = self.display.xfixes_get_cursor_image(self.root)
        if not cursor.width or not cursor.height:
            return
        # Premultiplied ARGB words; little-endian bytes are B, G, R, A.
        pixels = array.array("I", cursor.cursor_image).tobytes()
        sprite = PILImage.frombuffer("RGBA", (cursor.width, cursor.height), pixels, "raw", "BGRa", 0, 1)
        image.paste(sprite, (cursor.x - cursor.xhot, cursor.y - cursor.yhot), sprite)


def encode_png(image: PILImage.Image, compress_level: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


#: Largest encoded screenshot sent as is. Base64 adds a third and the engine keeps a whole
#: result under 900 KiB (the official MCP client refuses an event over 1 MiB), so a busy
#: large screen goes JPEG rather than being dropped.
MAX_IMAGE_BYTES = 640 * 1024


def encode_screenshot(image: PILImage.Image, compress_level: int, limit: int = MAX_IMAGE_BYTES) -> tuple[bytes, str]:
    """PNG when it fits in `limit` bytes, else the best JPEG quality that fits; (bytes, format).

    Never resized: the image's pixels stay the coordinates the other tools take.
    """
    png = encode_png(image, compress_level)
    if len(png) <= limit:
        return png, "png"
    jpeg = b""
    for quality in (85, 70, 50, 35, 20, 10):
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        jpeg = out.getvalue()
        if len(jpeg) <= limit:
            break
    return jpeg, "jpeg"
