"""The Grafana dashboard and the Prometheus alert rules, run against a real Prometheus.

A FastAPI service behind LoopguardMiddleware runs under uvicorn and
``opentelemetry-instrument`` with the Prometheus exporter (loopguard turned on by its
instrumentor; where loopguard is not installed with its entry points, the script sets
up the same exporter itself); a Prometheus server scrapes it every second and evaluates
``dashboards/alerts.yml``. The service is driven to produce every metric the panels
show (stalls, blocking calls, offloaded calls, shed requests); then every panel's
PromQL and every alert expression must return data.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from websockets.sync.client import connect as ws_connect

from loopguard import metrics

sys.path.insert(0, str(Path(__file__).parent / "integrations"))

from asgi_servers import spawn
from services import free_port, prometheus

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "dashboards" / "loopguard.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
APP = Path(__file__).parent / "integrations" / "prom_server.py"
BIN = Path(sys.executable).parent

_UNIT_SUFFIX = {"s": "_seconds", "By": "_bytes", "1": ""}


def prometheus_names(spec: metrics.MetricSpec) -> set[str]:
    """The series names the OpenTelemetry Prometheus exporter gives a metric."""
    base = spec.name.replace(".", "_") + _UNIT_SUFFIX.get(spec.unit, "")
    if spec.kind == "histogram":
        return {base + "_bucket", base + "_count", base + "_sum"}
    if spec.kind == "counter":
        return {base + "_total"}
    return {base}


DEFINED = {name for spec in metrics.SPECS.values() for name in prometheus_names(spec)}


def metric_names(expr: str) -> set[str]:
    """Metric names in a query (every selector in ours has a ``{...}`` matcher)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


def panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def concrete(expr: str) -> str:
    """A panel query with Grafana's variables replaced as Grafana would."""
    for variable, value in (
        ("$__rate_interval", "30s"),
        ("$__range", "10m"),
        ("$job", ".+"),
        ("$instance", ".+"),
    ):
        expr = expr.replace(variable, value)
    return expr


class Stack:
    """The service and the Prometheus server scraping it."""

    def __init__(self, app: str, prom: str) -> None:
        self.app = app
        self.prom = prom

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prom}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def eventually(self, expr: str, timeout: float = 40.0) -> list[dict[str, Any]]:
        """The query's result once it is not empty (scrapes and rates need a few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


def drive(base: str) -> None:
    """Produce every metric the dashboard shows from loopguard (see asgi_app.py)."""
    with httpx.Client(base_url=base, timeout=30) as client, ThreadPoolExecutor(6) as pool:
        # Offloaded calls queue behind limit=1; a blocking call runs on the loop.
        resized = pool.map(lambda _: admitted(client, "/resize", {"hold": 0.2}), range(4))
        assert [r.status_code for r in resized] == [200] * 4
        assert admitted(client, "/orders/1/sleep", {"hold": 0.01}, "POST").status_code == 200
        # A stall; then, while the loop's delay p99 is over the limit, requests are shed.
        assert admitted(client, "/items/1", {"hold": 0.4}).status_code == 200
        shed = [client.get("/hello").status_code for _ in range(5)]
        assert 503 in shed, shed
        # A broadcast subscriber that falls behind is evicted.
        announced = admitted(client, "/announce", {"count": 3}, "POST")
        assert announced.json() == {"evicted": 1}


@contextmanager
def ingest(base: str) -> Iterator[None]:
    """A guarded WebSocket receive loop kept open while Prometheus scrapes it.

    Its consumer is slower than the sender, so the queue fills and drops the oldest:
    queue size and capacity, drops and time in queue all have series.
    """
    url = "ws" + base.removeprefix("http") + "/ingest"
    with ws_connect(url, open_timeout=30) as ws:
        for i in range(40):
            ws.send(f"reading {i}")
        yield


def admitted(
    client: httpx.Client, path: str, params: dict[str, float], method: str = "GET"
) -> httpx.Response:
    """Request ``path`` until it is not shed (a loaded machine can trip the shedder)."""
    deadline = time.monotonic() + 30
    while True:
        response = client.request(method, path, params=params)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def zero_code() -> bool:
    """Whether ``opentelemetry-instrument`` can turn loopguard on here (entry points)."""
    found = metadata.entry_points(group="opentelemetry_instrumentor")
    registered = any(e.name == "loopguard" for e in found)
    return registered and (BIN / "opentelemetry-instrument").exists()


def server_command(port: int, metrics_port: int) -> tuple[list[str], dict[str, str]]:
    """The service under ``opentelemetry-instrument`` where loopguard's instrumentor is
    registered, else the same SDK exporter set up by the script itself."""
    env = {"SHED_DELAY_P99": "0.05"}
    if not zero_code():
        return [sys.executable, str(APP), str(port), str(metrics_port)], env
    env.update(
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port),
        OTEL_TRACES_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="loopguard-dashboard-test",
        OTEL_PYTHON_LOOPGUARD_THRESHOLD="0.1",
        OTEL_PYTHON_LOOPGUARD_STATS="1",
        OTEL_PYTHON_LOOPGUARD_BLOCKING="record",
        OTEL_PYTHON_LOOPGUARD_LOG="0",
    )
    # uvicorn's options through its environment: opentelemetry-instrument's argument
    # parser takes "--loop" for an abbreviation of its "--loopguard_*" flags.
    env.update(
        UVICORN_APP_DIR=str(APP.parent),
        UVICORN_HOST="127.0.0.1",
        UVICORN_PORT=str(port),
        UVICORN_LOOP="asyncio",
        UVICORN_LOG_LEVEL="warning",
    )
    command = [str(BIN / "opentelemetry-instrument"), str(BIN / "uvicorn"), "prom_server:app"]
    return command, env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus")
    port, metrics_port = free_port(), free_port()
    command, env = server_command(port, metrics_port)
    with (
        spawn(command, port, tmp / "app.log", env) as base,
        prometheus(tmp, [f"127.0.0.1:{metrics_port}"]) as prom,
    ):
        running = Stack(base, prom)
        assert running.eventually('up{job="app"} == 1'), "Prometheus never scraped the service"
        drive(base)
        with ingest(base):
            yield running


def test_stalls_and_loop_delay_reach_prometheus(stack: Stack) -> None:
    stalls = stack.eventually(
        'asyncio_eventloop_stall_count_total{asyncio_eventloop_stall_cause="blocked"} >= 1'
    )
    assert stalls, "the stall counter never reached Prometheus"
    assert stalls[0]["metric"]["otel_scope_name"] == "loopguard"
    if zero_code():  # turned on by opentelemetry-instrument, not by the script
        assert stack.query('target_info{service_name="loopguard-dashboard-test"}')
    heartbeats = stack.eventually("asyncio_eventloop_delay_seconds_count > 10")
    assert heartbeats, "the delay histogram never reached Prometheus"
    [p99] = stack.eventually(
        "histogram_quantile(0.99, sum by (le) (rate(asyncio_eventloop_delay_seconds_bucket[1m])))"
    )
    assert math.isfinite(float(p99["value"][1]))
    durations = stack.eventually("asyncio_eventloop_stall_duration_seconds_sum >= 0.3")
    assert durations, "the 0.4 s stall's duration is not in the histogram"


def test_every_dashboard_metric_is_defined_or_known_pending() -> None:
    used = {name for _, expr in panel_queries() for name in metric_names(expr)}
    used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert used <= DEFINED, used - DEFINED


@pytest.mark.parametrize(("title", "expr"), panel_queries(), ids=lambda v: str(v)[:60])
def test_every_panel_returns_data(stack: Stack, title: str, expr: str) -> None:
    stack.query(concrete(expr))  # valid PromQL
    assert stack.eventually(concrete(expr)), f"{title}: no data for {concrete(expr)}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_expression_returns_data(stack: Stack, rule: dict[str, Any]) -> None:
    expr = rule["expr"]
    query, comparison = re.fullmatch(r"(.+?)\s*((?:>|<|>=|<=|==)\s*[0-9.]+)", expr).groups()  # type: ignore[union-attr]
    # The expression is valid PromQL as a whole ...
    stack.query(expr)
    # ... and what it compares exists: the alert can fire.
    assert stack.eventually(query), f"{rule['alert']}: no data for {query} ({comparison})"
    # Prometheus itself loaded the rule and evaluates it without error.
    rules = httpx.get(f"{stack.prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    [loaded] = [r for g in rules for r in g["rules"] if r["name"] == rule["alert"]]
    assert loaded["health"] in {"ok", "unknown"}, loaded


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            # Every selector is scoped by the dashboard's job and instance variables.
            assert target["expr"].count('{job=~"$job", instance=~"$instance"') == len(
                re.findall(r"\{", target["expr"])
            ), target["expr"]
    # Every panel family the dashboard promises.
    titles = " / ".join(panel["title"] for panel in board["panels"])
    for shown in (
        "Loop delay p50 / p99",
        "Loop utilization",
        "Stalls by cause",
        "Top culprits",
        "Blocking calls",
        "Offload queueing",
        "Shed requests",
        "WebSocket receive queue depth",
        "WebSocket messages dropped",
        "WebSocket time in queue",
        "Broadcast evictions",
    ):
        assert shown in titles
