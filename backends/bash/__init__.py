"""The `bash` backend: one persistent real bash process per session.

Modules: `backend` (lifecycle and the `run` tool), `models` (config, arguments, result),
`shell` (the persistent shell over pipes, inside the session's sandbox), `capture` (bounded
output and sentinels), `interrupt` (stopping one command in any tier), `limits` (naming a limit
a command ran into).
"""

from backends.bash.backend import BashBackend, BashState
from backends.bash.models import BashConfig, RunArgs, RunResult

__all__ = ["BashBackend", "BashConfig", "BashState", "RunArgs", "RunResult"]
