"""LoopguardMiddleware under a real uvicorn with FastAPI, driven by real HTTP clients.

The service (``asgi_app.py``) runs in a subprocess with ``loopguard.install()``; each
test reads the events it wrote as JSON lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_servers import Server, serve

sys.path.insert(0, str(Path(__file__).parent.parent))

from helpers import line_of

APP = str(Path(__file__).parent / "asgi_app.py")


def _stall_of(route: str) -> Any:
    """Match a stall attributed to ``route`` (whatever its cause on a loaded machine)."""

    def match(event: dict[str, Any]) -> bool:
        return bool(event["kind"] == "stall" and event["attributes"].get("http.route") == route)

    return match


def _check_culprit(stall: dict[str, Any], marker: str) -> None:
    """Where the sampler saw the stack (not a c-held-gil stall), it names the line."""
    if stall["culprit"] is not None:
        assert stall["culprit"]["line"] == line_of(marker, APP)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service with the middleware (attribution only, no shedding)."""
    with serve(tmp_path_factory.mktemp("asgi"), {}) as running:
        yield running


def test_a_stall_carries_the_route_template_and_method(server: Server) -> None:
    assert httpx.get(f"{server.base}/items/7", params={"hold": 0.5}, timeout=30).status_code == 200
    stall = server.wait_for(_stall_of("/items/{item_id}"))
    _check_culprit(stall, "MARK:burn")
    assert stall["attributes"]["http.request.method"] == "GET"
    # The raw path (with the item id) never becomes an attribute value.
    assert "/items/7" not in stall["attributes"].values()


def test_a_mounted_route_is_named_with_its_mount_path(server: Server) -> None:
    response = httpx.get(f"{server.base}/admin/users/42", params={"hold": 0.5}, timeout=30)
    assert response.text == "42"
    stall = server.wait_for(_stall_of("/admin/users/{uid}"))
    _check_culprit(stall, "MARK:burn")


def test_a_blocking_call_carries_the_route_and_method(server: Server) -> None:
    response = httpx.post(f"{server.base}/orders/3/sleep", params={"hold": 0.05}, timeout=30)
    assert response.status_code == 200
    call = server.wait_for(lambda e: e["kind"] == "blocking_call" and e["function"] == "time.sleep")
    assert call["attributes"]["http.route"] == "/orders/{order_id}/sleep"
    assert call["attributes"]["http.request.method"] == "POST"
    assert call["culprit"]["line"] == line_of("MARK:sleep", APP)


def test_a_background_task_stall_names_the_function_and_the_route(server: Server) -> None:
    response = httpx.post(f"{server.base}/reports", params={"hold": 0.5}, timeout=30)
    assert response.json() == {"queued": "yes"}
    stall = server.wait_for(
        lambda e: e["kind"] == "stall" and "background.function" in e["attributes"], timeout=30
    )
    _check_culprit(stall, "MARK:burn")
    attributes = stall["attributes"]
    assert attributes["background.function"] == "asgi_app.rebuild_index"
    assert attributes["http.route"] == "/reports"
    assert attributes["http.request.method"] == "POST"


def test_without_the_middleware_a_background_stall_has_no_route(tmp_path: Path) -> None:
    """What users see today: a stall in "Task-N", nothing saying which route caused it."""
    with serve(tmp_path, None) as bare:
        sent = time.time()
        httpx.post(f"{bare.base}/reports", params={"hold": 0.5}, timeout=30)
        stall = bare.wait_for(
            lambda e: e["kind"] == "stall" and e["started_at"] >= sent and e["duration"] >= 0.4,
            timeout=30,
        )
    _check_culprit(stall, "MARK:burn")
    assert stall["task"].startswith("Task-")
    assert "http.route" not in stall["attributes"]
    assert "background.function" not in stall["attributes"]


def test_requests_after_a_stall_are_not_attributed_to_it(server: Server) -> None:
    """Attribution is per request task: a later request elsewhere carries its own route."""
    httpx.get(f"{server.base}/items/1", params={"hold": 0.4}, timeout=30)
    httpx.post(f"{server.base}/orders/9/sleep", params={"hold": 0.4}, timeout=30)
    sleep_line = line_of("MARK:sleep", APP)

    def in_sleep(event: dict[str, Any]) -> bool:
        culprit = event.get("culprit") or {}
        return bool(event["kind"] == "stall" and culprit.get("line") == sleep_line)

    stall = server.wait_for(in_sleep)
    assert stall["attributes"]["http.route"] == "/orders/{order_id}/sleep"
    assert stall["attributes"]["http.request.method"] == "POST"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("shed_delay_p99", 0),
        ("shed_delay_p99", -1.0),
        ("shed_delay_p99", float("nan")),
        ("shed_utilization", 1.5),
        ("shed_utilization", "0.5"),
        ("shed_window", 0),
        ("shed_window", 61),
        ("shed_check_every", 0),
        ("retry_after", -1),
        ("retry_after", 1.5),
        ("exempt_paths", "/health"),
        ("exempt_paths", ["health"]),
    ],
)
def test_bad_arguments_are_refused_naming_them(option: str, value: object) -> None:
    from fastapi import FastAPI
    from loopguard_integrations.asgi import LoopguardMiddleware

    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=option):
        LoopguardMiddleware(FastAPI(), **options)


def test_an_app_that_is_not_callable_is_refused() -> None:
    from loopguard_integrations.asgi import LoopguardMiddleware

    with pytest.raises(TypeError, match="app"):
        LoopguardMiddleware("not an app")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shed_window"):
        LoopguardMiddleware(lambda *a: None, shed_window=0)  # type: ignore[arg-type]
    from loopguard._core import attribution

    assert "http.route" not in attribution._registry  # a refused middleware registers nothing


def test_close_restores_background_task() -> None:
    from loopguard_integrations.asgi import LoopguardMiddleware
    from starlette.background import BackgroundTask

    original = BackgroundTask.__call__
    first = LoopguardMiddleware(lambda *a: None)  # type: ignore[arg-type]
    second = LoopguardMiddleware(lambda *a: None)  # type: ignore[arg-type]
    assert BackgroundTask.__call__ is not original
    first.close()
    assert BackgroundTask.__call__ is not original  # the second still needs it
    second.close()
    second.close()
    assert BackgroundTask.__call__ is original
    # Nothing stays registered once the last middleware closed.
    from loopguard._core import attribution

    assert "http.route" not in attribution._registry
