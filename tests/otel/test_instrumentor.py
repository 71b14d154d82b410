"""LoopguardInstrumentor in process: lifecycle, options, events in the blocked trace."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import collect, line_of
from opentelemetry.sdk import _logs as sdk_logs
from opentelemetry.sdk._logs import export as logs_export
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import loopguard
from loopguard import metrics
from loopguard._core import attribution
from loopguard._watchdog import env_options
from loopguard.otel import (
    BLOCKING_CALL_EVENT,
    STALL_EVENT,
    LoopguardInstrumentor,
    OtelEventSink,
    config_from_env,
)
from loopguard.testing import settle

_InMemory: Any = (
    getattr(logs_export, "InMemoryLogRecordExporter", None) or logs_export.InMemoryLogExporter
)

pytestmark = pytest.mark.loopguard(enabled=False)  # these tests block their loops on purpose


def blocked_handler() -> None:
    time.sleep(0.35)  # MARK:otel-block


BLOCK_LINE = line_of("MARK:otel-block", __file__)


@pytest.fixture
def logs() -> Iterator[Any]:
    exporter = _InMemory()
    provider = sdk_logs.LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(logs_export.SimpleLogRecordProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def instrumentor(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopguardInstrumentor]:
    monkeypatch.setenv("OTEL_PYTHON_LOOPGUARD_THRESHOLD", "0.15")
    monkeypatch.setenv("OTEL_PYTHON_LOOPGUARD_LOG", "0")
    inst = LoopguardInstrumentor()
    yield inst
    inst.uninstrument()


def _records(exporter: Any, name: str, function: str = "blocked_handler") -> list[Any]:
    """The records of this event whose culprit is ``function`` (a loaded machine may
    pause the test and add a stall elsewhere). Read at once: ``settle`` has waited
    until the sinks received every event."""
    return [
        r.log_record
        for r in exporter.get_finished_logs()
        if r.log_record.event_name == name
        and str(r.log_record.attributes.get("code.function.name")).endswith(function)
    ]


# -- options -----------------------------------------------------------------------------


def test_otel_variables_are_twins_of_the_loopguard_ones_and_win() -> None:
    config = config_from_env(
        {
            "LOOPGUARD_THRESHOLD": "0.5",
            "LOOPGUARD_BLOCKING": "record",
            "OTEL_PYTHON_LOOPGUARD_THRESHOLD": "0.25",
            "OTEL_PYTHON_LOOPGUARD_STATS": "1",
        }
    )
    assert (config.threshold, config.blocking, config.stats) == (0.25, "record", True)
    assert config_from_env({"LOOPGUARD_THRESHOLD": "0.4"}).threshold == 0.4


def test_every_option_is_a_flag_of_opentelemetry_instrument() -> None:
    import loopguard.otel as module

    names = {n for n in dir(module) if n.startswith("OTEL_")}
    expected = {"OTEL_PYTHON_LOOPGUARD_" + o.name.upper() for o in env_options()}
    assert names == expected
    assert "OTEL_PYTHON_LOOPGUARD_THRESHOLD" in names


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_PYTHON_LOOPGUARD_THRESHOLD": "fast"}, "OTEL_PYTHON_LOOPGUARD_THRESHOLD"),
        ({"OTEL_PYTHON_LOOPGUARD_THRESHOLD": "-1"}, "OTEL_PYTHON_LOOPGUARD_THRESHOLD"),
        ({"OTEL_PYTHON_LOOPGUARD_BLOCKING": "loud"}, "OTEL_PYTHON_LOOPGUARD_BLOCKING"),
        ({"OTEL_PYTHON_LOOPGUARD_NOPE": "1"}, "OTEL_PYTHON_LOOPGUARD_NOPE"),
        ({"LOOPGUARD_THRESHOLD": "x"}, "LOOPGUARD_THRESHOLD"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        config_from_env(env)


def test_invalid_value_logs_an_error_and_leaves_loopguard_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_LOOPGUARD_THRESHOLD", "soon")
    inst = LoopguardInstrumentor()
    with caplog.at_level(logging.ERROR, logger="loopguard"):
        inst.instrument()
    try:
        assert loopguard.current() is None
        assert "OTEL_PYTHON_LOOPGUARD_THRESHOLD='soon'" in caplog.text
        assert "loopguard stays off" in caplog.text
    finally:
        inst.uninstrument()


# -- lifecycle ---------------------------------------------------------------------------


def test_instrument_and_uninstrument_are_idempotent_and_undo_everything(
    instrumentor: LoopguardInstrumentor, logs: Any
) -> None:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor.instrument(
        meter_provider=provider, logger_provider=logs[0], tracer_provider=TracerProvider()
    )
    wd = loopguard.current()
    assert wd is not None and wd.config.threshold == 0.15
    assert vars(metrics)["_provider"] is provider
    assert attribution.TRACE_PARENT in attribution._registry
    instrumentor.instrument()  # warned by OpenTelemetry, nothing changes
    assert loopguard.current() is wd
    assert sum(isinstance(s, OtelEventSink) for s in wd.sinks.sinks) == 1
    instrumentor.uninstrument()
    assert loopguard.current() is None
    assert vars(metrics)["_provider"] is None
    assert attribution.TRACE_PARENT not in attribution._registry
    instrumentor.uninstrument()  # again: a no-op
    instrumentor.instrument()
    assert loopguard.current() is not None


def test_joins_a_watchdog_the_app_installed_and_leaves_it_running(
    instrumentor: LoopguardInstrumentor, logs: Any
) -> None:
    wd = loopguard.install(threshold=0.2, log=False)
    instrumentor.instrument(logger_provider=logs[0])
    assert loopguard.current() is wd
    assert any(isinstance(s, OtelEventSink) for s in wd.sinks.sinks)
    instrumentor.uninstrument()
    assert loopguard.current() is wd
    assert not any(isinstance(s, OtelEventSink) for s in wd.sinks.sinks)


# -- events in the trace of the blocked task --------------------------------------------


def test_stall_event_carries_the_line_and_the_blocked_requests_trace(
    instrumentor: LoopguardInstrumentor, logs: Any
) -> None:
    provider, exporter = logs
    reader = InMemoryMetricReader()
    tracer = TracerProvider().get_tracer("test")
    instrumentor.instrument(
        logger_provider=provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    spans: dict[str, Any] = {}

    async def request(name: str) -> None:
        with tracer.start_as_current_span(name) as span:
            spans[name] = span.get_span_context()
            await asyncio.sleep(0.05)
            if name == "blocked":
                blocked_handler()
            await asyncio.sleep(0.05)

    async def main() -> None:
        await asyncio.gather(request("other"), request("blocked"))

    asyncio.run(main())
    wd = loopguard.current()
    assert wd is not None
    settle(wd)
    [record] = _records(exporter, STALL_EVENT)
    attrs = dict(record.attributes)
    assert attrs["code.function.name"] == "blocked_handler"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == BLOCK_LINE
    assert f"line {BLOCK_LINE}, in blocked_handler" in attrs["code.stacktrace"]
    assert attrs["asyncio.eventloop.stall.cause"] == "blocked"
    assert attrs["asyncio.eventloop.stall.duration"] >= 0.15
    assert "traceparent" not in attrs
    assert record.trace_id == spans["blocked"].trace_id
    assert record.span_id == spans["blocked"].span_id
    assert spans["other"].trace_id != spans["blocked"].trace_id
    # The stall-duration histogram keeps an exemplar pointing at the same span.
    [point] = collect(reader)[metrics.EVENTLOOP_STALL_DURATION].data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert [(e.trace_id, e.span_id) for e in point.exemplars] == [
        (spans["blocked"].trace_id, spans["blocked"].span_id)
    ]


def test_stall_outside_any_trace_has_no_trace_link(
    instrumentor: LoopguardInstrumentor, logs: Any
) -> None:
    provider, exporter = logs
    instrumentor.instrument(logger_provider=provider)

    async def main() -> None:
        # Let the watchdog's first heartbeats on this new loop run before blocking it.
        await asyncio.sleep(0.2)
        blocked_handler()

    asyncio.run(main())
    wd = loopguard.current()
    assert wd is not None
    settle(wd)
    [record] = _records(exporter, STALL_EVENT)
    assert record.attributes["code.line.number"] == BLOCK_LINE
    assert not record.trace_id and not record.span_id


def test_blocking_call_event_in_the_callers_trace(
    instrumentor: LoopguardInstrumentor, logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_LOOPGUARD_BLOCKING", "record")
    monkeypatch.setenv("OTEL_PYTHON_LOOPGUARD_THRESHOLD", "5")
    provider, exporter = logs
    tracer = TracerProvider().get_tracer("test")
    instrumentor.instrument(logger_provider=provider)
    seen: dict[str, Any] = {}

    async def main() -> None:
        with tracer.start_as_current_span("req") as span:
            seen["span"] = span.get_span_context()
            time.sleep(0.01)  # MARK:otel-call

    asyncio.run(main())
    wd = loopguard.current()
    assert wd is not None
    settle(wd)
    [record] = _records(exporter, BLOCKING_CALL_EVENT, "main")  # qualified from 3.11
    attrs = dict(record.attributes)
    assert attrs["asyncio.blocking_call.function"] == "time.sleep"
    assert attrs["asyncio.blocking_call.action"] == "record"
    assert attrs["code.line.number"] == line_of("MARK:otel-call", __file__)
    assert (record.trace_id, record.span_id) == (seen["span"].trace_id, seen["span"].span_id)


def test_names_the_users_line_through_the_asyncio_instrumentation(
    instrumentor: LoopguardInstrumentor, logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor

    monkeypatch.setenv("OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE", "traced_work")
    provider, exporter = logs
    tracer_provider = TracerProvider()
    asyncio_instrumentor = AsyncioInstrumentor()
    asyncio_instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        instrumentor.instrument(logger_provider=provider)

        async def traced_work() -> None:
            await asyncio.sleep(0.02)
            blocked_handler()

        async def main() -> None:
            with tracer_provider.get_tracer("test").start_as_current_span("req"):
                await asyncio.create_task(traced_work())

        asyncio.run(main())
    finally:
        asyncio_instrumentor.uninstrument()
    wd = loopguard.current()
    assert wd is not None
    settle(wd)
    [record] = _records(exporter, STALL_EVENT)
    assert record.attributes["code.line.number"] == BLOCK_LINE
    assert record.attributes["code.function.name"] == "blocked_handler"
    # The coroutine was really wrapped: its frames sit under the instrumentation's.
    assert "opentelemetry/instrumentation/asyncio" in record.attributes["code.stacktrace"]
    assert record.trace_id  # inside the request's trace
