"""A real single-node Ray cluster for the ray-executor variants of the engine and bash tests.

Started once per test run (`ray start --head --block` in its own session), joined by the
test process exactly as a front end joins in production (by address), and torn down by
killing that session's processes, never with `ray stop` (which stops every Ray cluster
on the machine, other runs' included). Ray token authentication is on, with a token made
for the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support import procs

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The resources the tests' manifests use; each node advertises `agentflow.NAME` for them.
TEST_RESOURCES = ("bash", "fake", "other", "search")
START_TIMEOUT = 90.0


@dataclass
class RayHead:
    address: str
    process: subprocess.Popen[bytes]
    temp_dir: Path
    env: dict[str, str]

    @property
    def session_id(self) -> int:
        return self.process.pid  # started with start_new_session: its pid is the session id

    def processes(self) -> list[int]:
        """Every live process of this cluster (the head's session: GCS, raylet, workers, actors)."""
        found = []
        for pid in psutil.pids():
            with contextlib.suppress(OSError):
                if os.getsid(pid) == self.session_id and procs.alive(pid):
                    found.append(pid)
        return found


#: Ray reads these when it is first imported, so the run sets them before any test starts
#: (`configure_environment`): whichever test imports ray first, it sees them.
RAY_TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Single node on loopback only (a multi-node test clears it in its own subprocesses).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_AUTH_MODE": "token",
}


def configure_environment() -> None:
    """Put the Ray settings and a token made for this run into this process's environment."""
    for key, value in RAY_TEST_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def ray_env(scratch: Path) -> dict[str, str]:
    """The environment of the cluster's processes (and of the joining test process)."""
    return {
        **RAY_TEST_ENV,
        "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        "HOME": str(scratch / "home"),
    }


def start_head(scratch: Path, resources: tuple[str, ...] = TEST_RESOURCES) -> RayHead:
    """`ray start --head` on loopback with `agentflow.NAME` resources; returns once it accepts drivers."""
    (scratch / "home").mkdir(parents=True, exist_ok=True)
    # Short: Ray puts unix sockets under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="afr-", dir="/tmp"))
    env = ray_env(scratch)
    # The hosts import the repo's packages (and tests.fakes) by module path.
    child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    ray_bin = Path(sys.executable).with_name("ray")
    argv = [
        str(ray_bin), "start", "--head", "--block", "--port", "0", "--node-ip-address", "127.0.0.1",
        "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
        "--temp-dir", str(temp_dir),
        "--resources", json.dumps({f"agentflow.{name}": 1000 for name in resources}),
    ]  # fmt: skip
    log = (scratch / "ray-head.log").open("wb")
    process = subprocess.Popen(argv, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marker = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT
    while not (marker.exists() and marker.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_head(RayHead("", process, temp_dir, env))
            raise RuntimeError(f"ray start failed; see {scratch / 'ray-head.log'}")
        time.sleep(0.1)  # a file another process writes: nothing to wait on but a bounded poll
    return RayHead(marker.read_text().strip(), process, temp_dir, env)


def stop_head(head: RayHead, timeout: float = 5.0) -> list[int]:
    """Stop the cluster: SIGTERM its session, then SIGKILL what remains; returns what had to be killed."""
    pids = head.processes()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while head.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = head.processes()
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return killed


@contextlib.contextmanager
def joined(head: RayHead) -> Iterator[None]:
    """This process's environment as a front end of `head` (token, loopback), restored after."""
    saved = {key: os.environ.get(key) for key in head.env}
    os.environ.update({k: v for k, v in head.env.items() if k != "HOME"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
