"""The seccomp filter every `sandbox`-tier session runs under, written as classic BPF by hand.

Threat: a hostile process that already lives in an unprivileged user namespace with no
capabilities still talks to the host kernel directly. This filter removes the syscalls that
are either escape primitives (new user namespaces, mount APIs, setns), cross-process spying
(ptrace, process_vm_*, pidfd_getfd, kcmp), large kernel attack surface (bpf, perf_event_open,
userfaultfd, keyctl, io_uring) or host-wide actions (kexec, modules, reboot,
swap). They answer EPERM, so programs fail cleanly. `clone3` answers ENOSYS: its flags live in
memory BPF cannot read, and glibc then falls back to `clone`, whose flags are checked. A
foreign architecture (i386 via int 0x80) is killed; the x32 ABI answers EPERM. `ioctl(TIOCSTI)`
and `ioctl(TIOCLINUX)` are refused so a session cannot push keystrokes into a terminal.

No libseccomp needed: the program is a flat list of checks (two instructions each), loaded by
bubblewrap from a memfd (`--seccomp FD`).
"""

from __future__ import annotations

import errno
import struct

from backends.sandbox.memfd import data_fd

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
# struct seccomp_data offsets: nr, arch, instruction_pointer, args[6] (low word first on x86_64).
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0_LO = 16
_OFF_ARG1_LO = 24

CLONE_NEWUSER = 0x10000000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

#: x86_64 syscalls refused outright with EPERM.
DENIED_SYSCALLS: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "vhangup": 153,
    "pivot_root": 155,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "setns": 308,
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
SYS_IOCTL = 16
SYS_CLONE = 56
SYS_UNSHARE = 272
SYS_CLONE3 = 435


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _errno(value: int) -> int:
    return _RET_ERRNO | (value & 0xFFFF)


#: What a sandbox that builds its own nested sandboxes (Chromium's) must keep: joining and
#: making namespaces. Everything else stays denied.
NAMESPACE_SYSCALLS = frozenset({"setns"})


def build_filter(*, allow_user_namespaces: bool = False) -> bytes:
    """The filter as the bytes of a `struct sock_filter[]` (what `bwrap --seccomp` reads).

    `allow_user_namespaces` keeps `clone`/`unshare` with CLONE_NEWUSER, `clone3` and `setns`
    (for the browser's sandbox, where Chromium's own renderer sandbox needs them).
    """
    eperm = _errno(errno.EPERM)
    denied = {
        name: nr
        for name, nr in DENIED_SYSCALLS.items()
        if not (allow_user_namespaces and name in NAMESPACE_SYSCALLS)
    }
    prog = [
        _insn(_LD_W_ABS, _OFF_ARCH),
        _insn(_JEQ_K, _AUDIT_ARCH_X86_64, jt=1, jf=0),
        _insn(_RET_K, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, _OFF_NR),
        _insn(_JGE_K, _X32_SYSCALL_BIT, jt=0, jf=1),
        _insn(_RET_K, eperm),
    ]
    for nr in sorted(denied.values()):
        prog += [_insn(_JEQ_K, nr, jt=0, jf=1), _insn(_RET_K, eperm)]
    if not allow_user_namespaces:
        prog += [_insn(_JEQ_K, SYS_CLONE3, jt=0, jf=1), _insn(_RET_K, _errno(errno.ENOSYS))]
    # clone(flags, ...) and unshare(flags): refuse a new user namespace (the flag is in the low word).
    for nr in () if allow_user_namespaces else (SYS_CLONE, SYS_UNSHARE):
        prog += [
            _insn(_JEQ_K, nr, jt=0, jf=4),
            _insn(_LD_W_ABS, _OFF_ARG0_LO),
            _insn(_JSET_K, CLONE_NEWUSER, jt=0, jf=1),
            _insn(_RET_K, eperm),
            _insn(_RET_K, _RET_ALLOW),
        ]
    prog += [
        _insn(_JEQ_K, SYS_IOCTL, jt=0, jf=5),
        _insn(_LD_W_ABS, _OFF_ARG1_LO),
        _insn(_JEQ_K, TIOCSTI, jt=1, jf=0),
        _insn(_JEQ_K, TIOCLINUX, jt=0, jf=1),
        _insn(_RET_K, eperm),
        _insn(_RET_K, _RET_ALLOW),
    ]
    prog.append(_insn(_RET_K, _RET_ALLOW))
    return b"".join(prog)


_FILTER = build_filter()


def filter_fd() -> int:
    """A fresh memfd holding the filter, positioned at 0; the caller passes it on and closes it."""
    return data_fd(_FILTER, "agentflow-seccomp")
