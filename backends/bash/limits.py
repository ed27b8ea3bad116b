"""Telling a command that it ran into one of the session's limits, by name.

The kernel enforces the limits (the sandbox's cgroups and size-capped home and /tmp); what the
agent sees without help is a bare "Killed" or "Cannot fork". After each command the session's
limit counters are compared with the previous command's (one read of two cgroup files, ~20 us),
and a disk that is full is recognised from the command's own error output, so the answer can say
which limit was reached and that the session itself is fine.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from backends.sandbox import SessionSandbox

ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"
EAGAIN_TEXT = os.strerror(errno.EAGAIN)  # "Resource temporarily unavailable", as fork reports it


@dataclass(frozen=True, slots=True)
class LimitHit:
    message: str
    killed: bool
    """A process was killed (memory): the command's result is not what it would have been."""


class LimitWatch:
    """The session's limit counters as of the last command."""

    def __init__(self, sandbox: SessionSandbox, *, fresh: bool = False) -> None:
        """`fresh`: the sandbox was just made, so every counter is still zero (no read needed)."""
        self.sandbox = sandbox
        self.seen: dict[str, int] = {} if fresh else sandbox.limit_hits()

    def check(self, stderr: str) -> LimitHit | None:
        """What limit the last command ran into (since the previous check), or None."""
        now = self.sandbox.limit_hits()
        before, self.seen = self.seen, now
        limits = self.sandbox.spec.policy.limits
        messages: list[str] = []
        killed = now.get("memory_oom_kills", 0) > before.get("memory_oom_kills", 0)
        if killed:
            messages.append(
                f"the session's memory limit ({limits.memory_mb} MB, files in home and /tmp included) was "
                "reached; the kernel killed the largest process (out of memory)"
            )
        # gVisor enforces the process limit inside (an rlimit the host counters never see):
        # there a failed fork is recognised from what the command printed.
        failed_fork = EAGAIN_TEXT in stderr and "fork" in stderr
        if now.get("pids_max", 0) > before.get("pids_max", 0) or failed_fork:
            messages.append(
                f"the session's process limit ({limits.pids} processes and threads) was reached; starting more failed"
            )
        if ENOSPC_TEXT in stderr:
            messages.append(
                f"the session's disk limit ({limits.disk_mb} MB for home and for /tmp) is full; delete files "
                "to make room"
            )
        if not messages:
            return None
        return LimitHit("; ".join(messages), killed)
