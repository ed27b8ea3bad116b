"""The `bash` backend: one persistent real bash process per session.

Modules: `backend` (lifecycle and the `run` tool), `models` (config, arguments, result),
`shell` (the persistent shell over pipes), `capture` (bounded output and sentinels),
`isolation` (the bubblewrap command line).
"""

from backends.bash.backend import BashBackend, BashState
from backends.bash.models import BashConfig, RunArgs, RunResult

__all__ = ["BashBackend", "BashConfig", "BashState", "RunArgs", "RunResult"]
