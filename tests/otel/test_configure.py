"""``loopguard.otel.configure()`` and ``loopguard run --otel / --prometheus`` (real processes).

Each case runs in a fresh interpreter: OpenTelemetry's global providers can be set
once per process. Outputs are checked where they arrive: an OTLP/HTTP receiver in the
test, the Prometheus endpoint scraped over HTTP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from receiver import OtlpReceiver, attributes_of

BIN = Path(sys.executable).parent
LOOPGUARD = BIN / "loopguard"

pytestmark = pytest.mark.loopguard(enabled=False)  # the tests wait on subprocesses

BLOCK = textwrap.dedent(
    """
    import asyncio, time

    def parse_feed():
        time.sleep(0.4)  # line 5

    async def main():
        await asyncio.sleep(0.1)
        parse_feed()
        await asyncio.sleep(0.2)

    asyncio.run(main())
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPGUARD_"))}
    root = Path(__file__).resolve().parents[2]
    paths = [str(root), str(root / "integrations"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(OTEL_BLRP_SCHEDULE_DELAY="100", PYTHONUNBUFFERED="1", **extra)
    return env


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_configure_sends_metrics_and_events_over_otlp(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        code = (
            "import loopguard.otel\n"
            f"loopguard.otel.configure(otlp={receiver.endpoint!r}, export_interval=60)\n"
            "loopguard.install(threshold=0.2, log=False)\n" + BLOCK
        )
        done = _python(code, tmp_path, OTEL_PYTHON_LOOPGUARD_THRESHOLD="0.2")
    assert done.returncode == 0, done.stderr
    [stall] = receiver.received.events("asyncio.eventloop.stall")
    assert attributes_of(stall)["code.function.name"] == "parse_feed"
    line = code.splitlines().index("    time.sleep(0.4)  # line 5") + 1
    assert attributes_of(stall)["code.line.number"] == line
    names = {
        m.name
        for request in receiver.received.metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {"asyncio.eventloop.stall.count", "asyncio.eventloop.delay"} <= names


def test_configure_keeps_the_providers_the_app_set(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        code = textwrap.dedent(
            f"""
            from opentelemetry import _logs, metrics
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            _logs.set_logger_provider(LoggerProvider())
            import loopguard.otel
            loopguard.otel.configure(otlp={receiver.endpoint!r}, export_interval=0.2)
            """
        )
        code += BLOCK + textwrap.dedent(
            """
            found = {m.name for rm in reader.get_metrics_data().resource_metrics
                     for sm in rm.scope_metrics for m in sm.metrics}
            print("app reader:", sorted(n for n in found if "stall" in n))
            """
        )
        done = _python(code, tmp_path, OTEL_PYTHON_LOOPGUARD_THRESHOLD="0.2")
        time.sleep(0.5)
    assert done.returncode == 0, done.stderr
    assert "the application set a MeterProvider" in done.stderr
    assert "app reader: ['asyncio.eventloop.stall.count', 'asyncio.eventloop.stall.duration']" in (
        done.stdout
    )
    assert receiver.received.metrics == [] and receiver.received.logs == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [("", "choose an output"), ("prometheus='9464'", "prometheus: expected HOST:PORT")],
)
def test_configure_rejects_bad_arguments(tmp_path: Path, kwargs: str, message: str) -> None:
    done = _python(f"import loopguard.otel\nloopguard.otel.configure({kwargs})", tmp_path)
    assert done.returncode == 1
    assert f"ValueError: configure(): {message}" in done.stderr or message in done.stderr


# -- the CLI -----------------------------------------------------------------------------

needs_cli = pytest.mark.skipif(not LOOPGUARD.exists(), reason="needs the loopguard command")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_cli
def test_run_prometheus_serves_the_stall_metrics(tmp_path: Path) -> None:
    port = _free_port()
    script = tmp_path / "feed.py"
    script.write_text(BLOCK + "\nimport sys; print('ready', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen(
        [
            *(str(LOOPGUARD), "run", "--threshold", "0.2"),
            *("--prometheus", f"127.0.0.1:{port}", "--", sys.executable, str(script)),
        ],
        cwd=tmp_path,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        err = proc.communicate("", timeout=60)[1]
    assert proc.returncode == 0, err
    stall_lines = [line for line in text.splitlines() if line.startswith("asyncio_eventloop")]
    assert any(
        line.startswith("asyncio_eventloop_stall_count_total{")
        and 'asyncio_eventloop_stall_cause="blocked"' in line
        and line.endswith(" 1.0")
        for line in stall_lines
    ), stall_lines
    assert any(line.startswith("asyncio_eventloop_delay_seconds_bucket") for line in stall_lines)


@needs_cli
def test_run_otel_sends_the_stall_event_over_otlp(tmp_path: Path) -> None:
    script = tmp_path / "feed.py"
    script.write_text(BLOCK)
    with OtlpReceiver() as receiver:
        done = subprocess.run(
            [
                str(LOOPGUARD),
                "run",
                "--threshold",
                "0.2",
                "--otel",
                "--",
                sys.executable,
                str(script),
            ],
            cwd=tmp_path,
            env=_env(
                OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    [stall] = receiver.received.events("asyncio.eventloop.stall")
    attrs = attributes_of(stall)
    assert (attrs["code.function.name"], attrs["code.line.number"]) == ("parse_feed", 5)
    assert attrs["code.file.path"] == str(script)


@needs_cli
def test_run_rejects_a_bad_prometheus_address(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(LOOPGUARD), "run", "--prometheus", "localhost", "--", "true"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--prometheus: expected HOST:PORT, got 'localhost'" in done.stderr
