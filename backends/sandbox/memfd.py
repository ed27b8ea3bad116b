"""Data handed to a sandbox tool through a descriptor: bwrap's `--args`, `--seccomp` and `--ro-bind-data`."""

from __future__ import annotations

import os


def data_fd(content: bytes, name: str) -> int:
    """A fresh memfd holding `content`, at offset 0; the caller passes it on and closes it.

    Fresh per spawn: bubblewrap reads each such descriptor to EOF, and a shared file offset would race.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
