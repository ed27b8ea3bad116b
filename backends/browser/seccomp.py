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
"""

from __future__ import annotations

import errno
import platform
import struct

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_OFF_NR = 0
_OFF_ARCH = 4

#: x86_64 syscall numbers refused with EPERM.
DENIED: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "acct": 163,
    "pivot_root": 155,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
}


def supported() -> bool:
    """Whether this filter fits the machine (it is written for x86_64 syscall numbers)."""
    return platform.machine() == "x86_64"


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter as bytes of `struct sock_filter`, the format `bwrap --seccomp FD` reads."""
    eperm = _RET_ERRNO | errno.EPERM
    out = [
        _insn(_LD_W_ABS, 0, 0, _OFF_ARCH),
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _OFF_NR),
        _insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, eperm),
    ]
    for number in sorted(set(DENIED.values())):
        out += [_insn(_JEQ_K, 0, 1, number), _insn(_RET_K, 0, 0, eperm)]
    out.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(out)
