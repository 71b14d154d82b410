"""pytest plugin (placeholder while it is written)."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "loopguard(**options): loopguard settings for this test")
