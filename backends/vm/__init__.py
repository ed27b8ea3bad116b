"""The `vm` backend: a virtual X desktop per session (see `backends.vm.backend`).

Modules: `backend` (tools and lifecycle), `models` (config, settings, arguments,
results), `display` (the provider seam and Xvfb), `runner` (host or sandbox processes),
`allocator` (display numbers), `xconnect` and `xauth` (reaching a desktop by socket
path and cookie), `input` (XTEST mouse and keyboard), `keys` (key names and keymaps),
`capture` (screenshots and screen/model coordinates), `xgrab` (the pixels, over MIT-SHM).
"""

from backends.vm.backend import VMBackend, VMState
from backends.vm.display import Desktop, DesktopSpec, DisplayProvider, XvfbProvider
from backends.vm.models import Config, Settings

__all__ = ["Config", "Desktop", "DesktopSpec", "DisplayProvider", "Settings", "VMBackend", "VMState", "XvfbProvider"]
