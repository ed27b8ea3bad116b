"""The `bash` backend: one persistent real bash process per session."""

from backends.bash.backend import BashBackend, BashConfig, RunArgs

__all__ = ["BashBackend", "BashConfig", "RunArgs"]
