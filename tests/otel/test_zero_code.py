"""``opentelemetry-instrument`` turns loopguard on with no code change (real processes).

Each test starts the application under the real ``opentelemetry-instrument`` command,
with the real OTLP/HTTP exporters sending to a receiver inside the test
(:mod:`receiver`), and checks what arrived: the stall event's ``code.*`` fields and
its trace link to the request span that was blocked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from receiver import OtlpReceiver, Received, attributes_of

BIN = Path(sys.executable).parent
INSTRUMENT = BIN / "opentelemetry-instrument"
UVICORN = BIN / "uvicorn"


def _registered() -> bool:
    found = metadata.entry_points(group="opentelemetry_instrumentor")
    return any(e.name == "loopguard" and e.value.startswith("loopguard.") for e in found)


pytestmark = [
    pytest.mark.skipif(
        not INSTRUMENT.exists() or not _registered(),
        reason="needs loopguard installed with its entry points and opentelemetry-instrument "
        "beside this interpreter (pip install -e '.[dev]')",
    ),
    pytest.mark.loopguard(enabled=False),  # the tests wait on subprocesses
]

SCRIPT = textwrap.dedent(
    """
    import asyncio, time
    import loopguard

    def parse_feed():
        time.sleep(0.4)  # MARK:script-block

    async def main():
        await asyncio.sleep(0.1)
        parse_feed()
        await asyncio.sleep(0.3)
        print("loopguard on:", loopguard.current() is not None, flush=True)

    asyncio.run(main())
    """
)
SCRIPT_LINE = 6

APP = textwrap.dedent(
    """
    import asyncio, time
    from fastapi import FastAPI

    app = FastAPI()

    def load_report():
        time.sleep(0.4)  # MARK:app-block

    async def traced_work():
        await asyncio.sleep(0.01)
        load_report()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/reports/{report_id}")
    async def report(report_id: int):
        load_report()
        return {"id": report_id}

    @app.get("/wrapped")
    async def wrapped():
        await asyncio.create_task(traced_work())
        return {"ok": True}
    """
)
APP_LINE = 8


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPGUARD_"))}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="none",
        OTEL_BLRP_SCHEDULE_DELAY="100",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_SERVICE_NAME="loopguard-test",
        OTEL_PYTHON_LOOPGUARD_THRESHOLD="0.2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r
    assert r.errors == []


def _run_script(
    tmp_path: Path, receiver: OtlpReceiver, *flags: str, **env: str
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "feed.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [str(INSTRUMENT), *flags, sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(receiver, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _the_stall(received: Received) -> Any:
    # The one in parse_feed (a loaded machine may pause the process and add another).
    [record] = [
        r
        for r in received.events("asyncio.eventloop.stall")
        if attributes_of(r).get("code.function.name") == "parse_feed"
    ]
    return record


def test_python_script_gets_loopguard_and_sends_the_stall_with_its_line(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    done = _run_script(tmp_path, receiver)
    assert done.returncode == 0, done.stderr
    assert "loopguard on: True" in done.stdout
    attrs = attributes_of(_the_stall(receiver.received))
    assert attrs["code.function.name"] == "parse_feed"
    assert attrs["code.file.path"] == str(tmp_path / "feed.py")
    assert attrs["code.line.number"] == SCRIPT_LINE
    assert "in parse_feed" in attrs["code.stacktrace"]
    assert attrs["asyncio.eventloop.stall.cause"] == "blocked"
    assert attrs["asyncio.eventloop.stall.duration"] >= 0.2


def test_disabled_instrumentations_keep_loopguard_off(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    done = _run_script(tmp_path, receiver, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="loopguard")
    assert done.returncode == 0, done.stderr
    assert "loopguard on: False" in done.stdout
    assert receiver.received.events("asyncio.eventloop.stall") == []
    assert "event loop blocked" not in done.stderr


def test_invalid_value_logs_the_variable_and_the_app_runs_without_loopguard(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    done = _run_script(tmp_path, receiver, OTEL_PYTHON_LOOPGUARD_THRESHOLD="fast")
    assert done.returncode == 0, done.stderr
    assert "loopguard on: False" in done.stdout
    assert "OTEL_PYTHON_LOOPGUARD_THRESHOLD='fast'" in done.stderr
    assert receiver.received.events("asyncio.eventloop.stall") == []


def test_flags_of_opentelemetry_instrument_set_the_options(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    done = _run_script(
        tmp_path, receiver, "--loopguard_threshold", "1.5", "--loopguard_blocking", "record"
    )
    assert done.returncode == 0, done.stderr
    # 0.4 s is under the 1.5 s threshold: no stall, but the blocking call is reported.
    assert receiver.received.events("asyncio.eventloop.stall") == []
    [call] = receiver.received.events("asyncio.blocking_call")
    attrs = attributes_of(call)
    assert attrs["asyncio.blocking_call.function"] == "time.sleep"
    assert attrs["code.line.number"] == SCRIPT_LINE


def test_loopguard_variables_keep_working(tmp_path: Path, receiver: OtlpReceiver) -> None:
    env = _env(receiver, LOOPGUARD_THRESHOLD="1.5")
    del env["OTEL_PYTHON_LOOPGUARD_THRESHOLD"]
    done = subprocess.run(
        [str(INSTRUMENT), sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "loopguard on: True" in done.stdout
    assert receiver.received.events("asyncio.eventloop.stall") == []  # 0.4 s < 1.5 s


# -- a real uvicorn + FastAPI service --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(tmp_path: Path, env: Mapping[str, str]) -> tuple[subprocess.Popen[str], str]:
    (tmp_path / "app.py").write_text(APP)
    port = _free_port()
    proc = subprocess.Popen(
        [str(INSTRUMENT), str(UVICORN), "app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.communicate()[0]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.communicate()[0]}")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down; the SDK flushes at exit
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


@pytest.mark.skipif(not UVICORN.exists(), reason="needs uvicorn beside this interpreter")
def test_uvicorn_app_stall_event_links_to_the_blocked_request_span(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    env = _env(receiver, OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE="traced_work")
    proc, base = _serve(tmp_path, env)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/reports/7").json() == {"id": 7}
            time.sleep(0.3)  # two separate stalls
            assert client.get("/wrapped").status_code == 200
    finally:
        output = _stop(proc)
    received = receiver.received
    # Only the two handlers' stalls: a loaded machine may add one at start-up.
    stalls = [
        r
        for r in received.events("asyncio.eventloop.stall")
        if attributes_of(r).get("code.function.name") == "load_report"
    ]
    assert len(stalls) == 2, output
    spans = list(received.spans())
    servers = {attributes_of(s).get("http.route"): s for s in spans if s.kind == 2}
    assert {"/reports/{report_id}", "/wrapped"} <= set(servers), [s.name for s in spans]
    for stall in stalls:
        attrs = attributes_of(stall)
        assert attrs["code.function.name"] == "load_report"
        assert attrs["code.file.path"] == str(tmp_path / "app.py")
        assert attrs["code.line.number"] == APP_LINE
    direct, wrapped = sorted(stalls, key=lambda r: r.time_unix_nano)
    # The request handler itself was blocked: the event sits on its server span.
    request = servers["/reports/{report_id}"]
    assert (direct.trace_id, direct.span_id) == (request.trace_id, request.span_id)
    # Blocked inside a coroutine the asyncio instrumentation wrapped (it starts a span
    # of its own without making it current): still the user's line, still the
    # request's span, and the wrapper really ran.
    request = servers["/wrapped"]
    assert (wrapped.trace_id, wrapped.span_id) == (request.trace_id, request.span_id)
    assert "trace_coroutine" in attributes_of(wrapped)["code.stacktrace"]
    assert any(s.name.endswith("coro-traced_work") for s in spans), [s.name for s in spans]
