"""The `browser` backend: a shared sandboxed Chromium with a private context per session.

`BrowserBackend` (backend.py) holds the lifecycle and tools; `models.py` the Config,
Settings, argument and result models; `Launcher` (launcher.py) the driver and browser
processes; `sandbox.py` how Chromium is confined; `proxy.py` the egress proxy every page
request goes through; `BrowserSession` (session.py) one session's context and tabs;
`snapshot.py` the accessibility snapshot and its element refs.
"""

from backends.browser.backend import BrowserBackend
from backends.browser.models import BrowserConfig, BrowserSettings

__all__ = ["BrowserBackend", "BrowserConfig", "BrowserSettings"]
