from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import loopguard
from loopguard import metrics

sys.path.insert(0, str(Path(__file__).parent))

from helpers import BACKENDS

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _no_leftover_watchdog() -> Iterator[None]:
    yield
    loopguard.uninstall()


# Async tests marked ``pytest.mark.anyio`` run on each loop loopguard supports.
@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    """A real OpenTelemetry SDK reader that loopguard's instruments report to."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.use_meter_provider(provider)
    try:
        yield reader
    finally:
        metrics.use_meter_provider(None)
        provider.shutdown()
