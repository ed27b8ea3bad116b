"""Fixtures for sandbox tests (see tests/sandbox/helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.sandbox.helpers import BoxFactory, box_factory


@pytest.fixture
async def make_box(tmp_path: Path) -> AsyncIterator[BoxFactory]:
    async for make in box_factory(tmp_path):
        yield make
