"""Fixtures of the framework tier (helpers in helpers.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.frameworks.helpers import ROOT, VENVS


@pytest.fixture(scope="session")
def framework_venvs() -> dict[str, Path]:
    """name -> interpreter of every framework venv (made or refreshed by scripts/framework-venvs)."""
    completed = subprocess.run([str(ROOT / "scripts" / "framework-venvs")], timeout=900, check=False)
    if completed.returncode != 0:
        pytest.fail(f"scripts/framework-venvs failed ({completed.returncode}); it needs PyPI to build {VENVS}")
    pythons = {path.parent.parent.name: path for path in VENVS.glob("*/bin/python")}
    assert pythons, f"scripts/framework-venvs made no venv under {VENVS}"
    return pythons
