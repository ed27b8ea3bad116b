"""The `vm` backend: a virtual X desktop per session (see `backends.vm.backend`).

Modules: `backend` (tools and lifecycle), `models` (config and argument schemas),
`display` (where desktops come from: the provider seam and local Xvfb), `input`
(XTEST mouse and keyboard), `keys` (key names and keymaps), `capture` (screenshots
and screen/model coordinates).
"""

from backends.vm.backend import VMBackend, VMState
from backends.vm.display import Desktop, DesktopSpec, DisplayProvider, XvfbProvider
from backends.vm.models import Config

__all__ = ["Config", "Desktop", "DesktopSpec", "DisplayProvider", "VMBackend", "VMState", "XvfbProvider"]
