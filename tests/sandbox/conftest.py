"""Fixtures for sandbox tests (see tests/sandbox/helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.sandbox.helpers import CHAINS, BoxFactory, box_factory, use_chain


@pytest.fixture
async def make_box(tmp_path: Path) -> AsyncIterator[BoxFactory]:
    async for make in box_factory(tmp_path):
        yield make


@pytest.fixture(params=CHAINS)
def chain(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using it runs with the launcher and with the fallback chain."""
    use_chain(request.param, monkeypatch)
    return str(request.param)
