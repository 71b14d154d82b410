from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import loopguard

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _no_leftover_watchdog() -> Iterator[None]:
    yield
    loopguard.uninstall()
