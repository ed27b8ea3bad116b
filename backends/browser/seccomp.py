"""The seccomp filter of the browser's bubblewrap sandbox (classic BPF, loaded by bwrap).

Threat: a page that exploits the renderer *and* escapes Chromium's own sandbox lands in the
browser process, as the browser uid, inside bubblewrap. This filter takes away what such
code would use next against the host kernel or other processes: ptrace and cross-process
memory access, kernel keyrings, bpf, perf events, userfaultfd, io_uring, module loading,
kexec, mounts, swap and reboot. They answer EPERM.

Unlike the filter of a session's sandbox, it allows new user, PID and network namespaces
(`clone`/`unshare` with CLONE_NEWUSER) and `chroot`: that is how Chromium builds its own
renderer sandbox, which stays on. Chromium's per-process seccomp filters stack on top.
A foreign architecture (i386 via int 0x80) is killed; the x32 ABI answers EPERM.

It is the session sandbox's filter (`backends.sandbox.seccomp`) with namespaces allowed.
"""

from __future__ import annotations

import platform

from backends.sandbox.seccomp import DENIED_SYSCALLS, NAMESPACE_SYSCALLS, build_filter

#: What this filter denies (EPERM): the session filter's list less the namespace calls.
DENIED: dict[str, int] = {k: v for k, v in DENIED_SYSCALLS.items() if k not in NAMESPACE_SYSCALLS}


def supported() -> bool:
    """Whether this filter fits the machine (it is written for x86_64 syscall numbers)."""
    return platform.machine() == "x86_64"


def program() -> bytes:
    """The filter as bytes of `struct sock_filter`, the format `bwrap --seccomp FD` reads."""
    return build_filter(allow_user_namespaces=True)
