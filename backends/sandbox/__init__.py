"""Session sandboxes: run a session's processes under the isolation tier its policy names.

Tiers (`Policy.isolation`): `none` (own process group and cgroup only; network `none` still gets
an empty network namespace), `sandbox` (bubblewrap, unprivileged user namespace, own uid,
seccomp; the default) and `gvisor` (runsc, OCI bundle). Limits come from cgroups (rlimits when
there are none); cleanup finds processes by cgroup membership. A tier or network the host cannot
provide is refused with ConfigurationError (5001), never downgraded.

Use:
    box = await SessionSandbox.create(SandboxSpec(label=..., policy=..., server_id=..., home=...))
    proc = await box.spawn(["/bin/bash", "--noprofile", "--norc"], env={"HOME": box.home_path, ...})
    shell_pid = await box.wait_inner_pid(proc)   # signal this one (SIGINT to the shell)
    ...
    await box.aclose()   # every process of the session is gone on return

Integration notes:
- Every spawn starts with default signal dispositions and an empty signal mask (whatever the
  server ignores), inside the session's cgroups, at the spec's niceness (`SandboxSpec.nice`;
  `renice` moves a live session), through `agentflow-launch` (launcher.c, built on first use)
  or, without a C compiler, the equivalent `sh` + `nice` + `setpriv` + `env` chain.
- `env` is the whole environment inside; set HOME to `box.home_path` (`/home/user` in the
  sandboxed tiers, the host path for `none`).
- In `sandbox`, each `spawn` is its own bubblewrap instance (own pid namespace); they share the
  session's uid, cgroup, home and /tmp. When a spawned program exits, bwrap's pid 1 exits and
  everything that program left running in its namespace dies with it.
- Bind host paths are staged so the unprivileged sandbox can reach them, but their own
  permissions still apply: chown/chmod what the session must write (e.g. an X socket dir).
- `limit_hits()` tells which limit was hit (OOM kills, pids.max) for a 2001 message.
"""

from backends.sandbox.host import mechanisms
from backends.sandbox.session_sandbox import SessionSandbox
from backends.sandbox.spec import HOME_INSIDE, Bind, SandboxSpec
from backends.sandbox.sweep import SweepReport, sweep_orphans

__all__ = ["HOME_INSIDE", "Bind", "SandboxSpec", "SessionSandbox", "SweepReport", "mechanisms", "sweep_orphans"]
