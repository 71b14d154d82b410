"""Stalls carry attributes read from the running task's registered context variables."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator

import pytest
from helpers import sleepy

import loopguard
from loopguard._core.attribution import MAX_ATTRIBUTES, MAX_VALUE_LENGTH

# These tests block event loops on purpose: the plugin must not fail them.
pytestmark = pytest.mark.loopguard(enabled=False)

route: contextvars.ContextVar[str] = contextvars.ContextVar("route")
trace: contextvars.ContextVar[object] = contextvars.ContextVar("trace")
secret: contextvars.ContextVar[str] = contextvars.ContextVar("secret")


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    loopguard.attribute("http.route", route)
    loopguard.attribute("trace_id", trace)
    yield
    loopguard.unattribute("http.route")
    loopguard.unattribute("trace_id")


def test_stall_carries_route_and_trace_of_the_blocking_task() -> None:
    async def request(path: str, block: bool) -> None:
        route.set(path)
        trace.set("x" * 1000)
        secret.set("hunter2")
        await asyncio.sleep(0.05)
        if block:
            sleepy(0.25)
        await asyncio.sleep(0.05)

    async def main() -> None:
        await asyncio.gather(
            asyncio.create_task(request("/healthy", False), name="req-1"),
            asyncio.create_task(request("/orders/{id}", True), name="req-2"),
        )

    with loopguard.watch(threshold=0.1) as wd:
        asyncio.run(main())
        time.sleep(0.2)
        stalls = wd.stalls
    assert len(stalls) == 1
    attrs = dict(stalls[0].attributes)
    assert attrs["task.name"] == "req-2"
    assert attrs["http.route"] == "/orders/{id}"
    assert attrs["trace_id"] == "x" * MAX_VALUE_LENGTH  # bounded
    assert "hunter2" not in str(stalls[0].to_dict())  # unregistered variables never read


def test_uvloop_tasks_carry_attributes_and_converters_keep_text_only() -> None:
    uvloop = pytest.importorskip("uvloop")
    loopguard.attribute("trace.parts", trace, lambda value: "-".join(value))
    held: list[object] = []

    async def request() -> None:
        route.set("/uv/{id}")
        value = ("a", "b")
        held.append(value)
        trace.set(value)
        await asyncio.sleep(0.05)
        sleepy(0.25)
        await asyncio.sleep(0.05)

    async def main() -> None:
        await asyncio.create_task(request(), name="uv-req")

    try:
        with loopguard.watch(threshold=0.1) as wd:
            uvloop.run(main())
            time.sleep(0.2)
            stalls = wd.stalls
    finally:
        loopguard.unattribute("trace.parts")
    [stall] = stalls
    assert stall.loop == "uvloop"
    assert dict(stall.attributes) == {
        "task.name": "uv-req",
        "http.route": "/uv/{id}",
        "trace_id": "('a', 'b')",
        "trace.parts": "a-b",
    }


def test_registration_errors() -> None:
    with pytest.raises(TypeError, match="ContextVar"):
        loopguard.attribute("bad", "not a var")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        loopguard.attribute("", route)
    room = MAX_ATTRIBUTES - 2  # the fixture registered two
    names = [f"extra{i}" for i in range(room)]
    try:
        for name in names:
            loopguard.attribute(name, route)
        with pytest.raises(ValueError, match="at most"):
            loopguard.attribute("one-too-many", route)
        loopguard.attribute(names[0], trace)  # re-registering a name takes no room
    finally:
        for name in names:
            loopguard.unattribute(name)
