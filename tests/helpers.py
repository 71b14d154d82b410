"""Shared helpers for loopguard's own tests: blocking functions with known lines."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric


def line_of(marker: str, path: str = __file__) -> int:
    """Return the 1-based line number of the line that contains ``marker``."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if marker in line and "line_of(" not in line:
                return number
    raise AssertionError(f"marker {marker!r} not in {path}")


def sleepy(seconds: float) -> None:
    """Block in a C call that releases the GIL."""
    time.sleep(seconds)  # MARK:sleepy


def spin(seconds: float) -> int:
    """Block in pure Python."""
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:  # MARK:spin
        n += 1  # MARK:spin2
    return n


SLEEPY_LINE = line_of("MARK:sleepy")
SPIN_LINES = {line_of("MARK:spin"), line_of("MARK:spin2")}


def regex_hold(n: int = 23) -> bool:
    """Hold the GIL in C: a catastrophic regex (each +1 on ``n`` doubles the time)."""
    return re.match(r"^(a+)+$", "a" * n + "!") is not None  # MARK:regex


def hog_later(delay: float, n: int = 23) -> None:
    """Worker thread body: wait, then hold the GIL in C."""
    time.sleep(delay)
    re.match(r"^(a+)+$", "a" * n + "!")  # MARK:hog


SLOW_ASGI_APP = """
import time

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    time.sleep(0.3)  # MARK:handler
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""
"""An ASGI application whose every request blocks its loop for 0.3 s (for real servers)."""

REGEX_LINE = line_of("MARK:regex")
HOG_LINE = line_of("MARK:hog")


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Every metric the reader holds now, by name (all from loopguard's meter)."""
    import loopguard

    data = reader.get_metrics_data()
    found: dict[str, Metric] = {}
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "loopguard"
            assert scope.scope.version == loopguard.__version__
            for metric in scope.metrics:
                found[metric.name] = metric
    return found


# The anyio backends loopguard supports, for ``anyio_backend`` parametrization.
BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
