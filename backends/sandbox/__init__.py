"""Session sandboxes: run a session's processes under the isolation tier its policy names.

Tiers (`Policy.isolation`): `none` (own process group and cgroup only), `sandbox` (bubblewrap,
unprivileged user namespace, own uid, seccomp; the default) and `gvisor` (runsc). Limits come
from cgroups (rlimits when there are none); cleanup finds processes by cgroup membership.
A tier or network the host cannot provide is refused with ConfigurationError (5001).

Use:
    box = await SessionSandbox.create(SandboxSpec(label=..., policy=..., server_id=..., home=...))
    proc = await box.spawn(["/bin/bash", "--noprofile", "--norc"], env={"HOME": box.home_path, ...})
    ...
    await box.aclose()   # every process of the session is gone on return
"""

from backends.sandbox.host import mechanisms
from backends.sandbox.session_sandbox import SessionSandbox
from backends.sandbox.spec import HOME_INSIDE, Bind, SandboxSpec
from backends.sandbox.sweep import SweepReport, sweep_orphans

__all__ = ["HOME_INSIDE", "Bind", "SandboxSpec", "SessionSandbox", "SweepReport", "mechanisms", "sweep_orphans"]
