"""Manifest files for the servers the tests start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: A bash session's environment variable naming the test that created it (legacy per-test
#: marker; `leaks.session_pids(test_marker=...)` narrows to one test's processes with it).
TEST_MARKER_ENV = "AGENTFLOW_TEST_RUN"


def write_manifest(
    directory: Path,
    *,
    session_ttl: float = 300.0,
    resources: dict[str, Any] | None = None,
    test_marker: str | None = None,
    name: str = "manifest.json",
    log_level: str = "WARNING",
    disconnect_grace: float = 0.0,
    isolation: str = "none",
    server: dict[str, Any] | None = None,
) -> Path:
    """Write a JSON manifest (server on 127.0.0.1) and return its path.

    Without `resources`: one bash resource (20 s command timeout) whose shells carry
    `AGENTFLOW_TEST_RUN=<test_marker>` when a marker is given. No disconnect grace unless
    asked (most tests watch a disconnect end sessions) and isolation `none` unless asked
    (they read the shell's host pid through `$$`; tests/security covers the tiers).
    """
    if resources is None:
        config: dict[str, Any] = {"timeout": 20}
        if test_marker is not None:
            config["env"] = {TEST_MARKER_ENV: test_marker}
        resources = {"bash": {"enabled": True, "config": config, "policy": {"isolation": isolation}}}
    payload = {
        "server": {
            "session_ttl": session_ttl,
            "disconnect_grace": disconnect_grace,
            "host": "127.0.0.1",
            "log_level": log_level,
            **(server or {}),
        },
        "resources": resources,
    }
    path = directory / name
    path.write_text(json.dumps(payload))
    return path
