"""Does a warm-pool member's CPU priority reach the scheduler? Two busy loops pinned to one core:
a "pool member" and a "caller", each placed as sessions are (own cpu cgroup under
`agentflow/<id>/`), the member with nice 19 and/or its cgroup's cpu weight lowered. Prints the
member's share of the core. Run as root on the host being measured (cgroup v1 or v2):

    python bench/bench_pool_priority.py

Why it matters: every session has its own cpu cgroup, and the kernel schedules a cgroup as one
entity among its siblings by its weight (v1 cpu.shares, v2 cpu.weight); a task's niceness only
ranks it among the tasks of its own cgroup. So a pooled start's niceness alone may yield nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.sandbox import cgroups

LOOP = "while True: pass"
#: (weight file, normal value, lowest value) per cgroup version.
WEIGHTS = {1: ("cpu.shares", "1024", "2"), 2: ("cpu.weight", "100", "1")}


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy(cgroup: Path | None, nice: int) -> subprocess.Popen[bytes]:
    def enter() -> None:
        os.sched_setaffinity(0, {0})
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text("0")
        os.nice(nice)

    return subprocess.Popen([sys.executable, "-c", LOOP], preexec_fn=enter)


def share(member: subprocess.Popen[bytes], caller: subprocess.Popen[bytes], seconds: float) -> float:
    time.sleep(0.5)  # both past their start-up
    m0, c0 = ticks(member.pid), ticks(caller.pid)
    time.sleep(seconds)
    m1, c1 = ticks(member.pid), ticks(caller.pid)
    for proc in (member, caller):
        proc.kill()
        proc.wait()
    return (m1 - m0) / max((m1 - m0) + (c1 - c0), 1)


def main(seconds: float = 1.5) -> None:
    host = cgroups.probe()
    if host.version is None or "cpu" not in host.bases:
        sys.exit(f"no usable cpu cgroup controller: {host.reason or 'cpu not delegated'}")
    weight_file, normal, lowest = WEIGHTS[host.version]
    root = host.bases["cpu"] / "agentflow" / f"bench-priority-{os.getpid()}"
    member_dir, caller_dir = root / "member", root / "caller"
    for directory in (member_dir, caller_dir):
        directory.mkdir(parents=True)
    cases: list[tuple[str, Callable[[], tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]]] = [
        ("own cgroups, member nice 0", lambda: (busy(member_dir, 0), busy(caller_dir, 0))),
        ("own cgroups, member nice 19", lambda: (busy(member_dir, 19), busy(caller_dir, 0))),
        (f"own cgroups, member {weight_file}={lowest}", lambda: (busy(member_dir, 0), busy(caller_dir, 0))),
        ("one cgroup, member nice 19", lambda: (busy(member_dir, 19), busy(member_dir, 0))),
        ("member nice 19 vs a process outside agentflow (the server)", lambda: (busy(member_dir, 19), busy(None, 0))),
    ]
    try:
        for name, make in cases:
            (member_dir / weight_file).write_text(lowest if weight_file in name else normal)
            member, caller = make()
            line = f"{name:<62} member's share of core 0: {share(member, caller, seconds):6.1%}"
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    finally:
        for directory in (member_dir, caller_dir, root):
            directory.rmdir()


if __name__ == "__main__":
    main()
