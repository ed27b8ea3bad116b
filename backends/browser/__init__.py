"""The `browser` backend: a shared headless Chromium with a private context per session.

`BrowserBackend` (backend.py) holds the tools; `Launcher` (launcher.py) the shared
browser process; `BrowserSession` (session.py) one session's context and tabs;
`snapshot.py` the accessibility snapshot and its element refs.
"""

from .backend import BrowserBackend
from .config import BrowserConfig, LaunchSettings

__all__ = ["BrowserBackend", "BrowserConfig", "LaunchSettings"]
