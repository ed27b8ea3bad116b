"""Display numbers the server picks for its desktops.

A desktop's number names it to X clients (`DISPLAY=:N`) and to a browser session that
shows its pages there. The allocator never hands one number to two live desktops of
this backend, and skips numbers the host already uses (a lock file or socket under
/tmp), so a number also means one thing on the host. Sandboxed desktops keep their
sockets in per-session directories and never listen on abstract sockets, so two
servers picking the same number cannot collide; a host (`none`) desktop that loses a
race for a number to another program gets the next one (see `XvfbProvider`).
"""

from __future__ import annotations

import os
import socket

from session.errors import ResourceUnavailable


class DisplayAllocator:
    """Hands out display numbers in `[first, first + count)`, lowest free first."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count
        self._live: set[int] = set()

    def take(self, avoid: frozenset[int] = frozenset()) -> int:
        """A number no live desktop of ours has and the host does not use.

        Raises:
            ResourceUnavailable: every number of the range is taken (2004).
        """
        for number in range(self.first, self.first + self.count):
            if number in self._live or number in avoid or _used_on_host(number):
                continue
            self._live.add(number)
            return number
        raise ResourceUnavailable(
            f"no free display number in {self.first}..{self.first + self.count - 1}: "
            f"{len(self._live)} desktops are live; destroy one or raise resources.vm.settings.display_count"
        )

    def release(self, number: int) -> None:
        self._live.discard(number)

    @property
    def live(self) -> frozenset[int]:
        return frozenset(self._live)


def _used_on_host(number: int) -> bool:
    """True if an X server holds `number` here: its lock file, or a socket that still answers.

    A socket nobody listens on is what a killed X server leaves behind; Xvfb replaces it.
    """
    if os.path.lexists(f"/tmp/.X{number}-lock"):
        return True
    path = f"/tmp/.X11-unix/X{number}"
    if not os.path.lexists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True
