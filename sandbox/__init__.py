"""The Python client: `async with Sandbox() as sandbox: await sandbox.execute("bash:run", {...})`."""

from sandbox.client import Sandbox
from session.errors import SandboxError

__all__ = ["Sandbox", "SandboxError"]
