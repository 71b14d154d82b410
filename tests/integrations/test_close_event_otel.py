"""ConnectionClosed reaches OpenTelemetry as a log record (real SDK logger provider)."""

from __future__ import annotations

from opentelemetry.sdk import _logs as sdk_logs
from opentelemetry.sdk._logs import export as logs_export

from loopguard.events import ConnectionClosed, Frame
from loopguard.otel import CONNECTION_CLOSED_EVENT, OtelEventSink

_Exporter = (
    getattr(logs_export, "InMemoryLogRecordExporter", None) or logs_export.InMemoryLogExporter
)


def test_a_close_is_sent_with_its_code_queue_state_and_culprit() -> None:
    exporter = _Exporter()
    provider = sdk_logs.LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(logs_export.SimpleLogRecordProcessor(exporter))
    event = ConnectionClosed(
        code=1011,
        reason="keepalive",
        route="/feed",
        depth=3,
        maxsize=10,
        delivered=7,
        dropped=1,
        ping_rtt=0.002,
        stall=Frame("app.py", 41, "rebuild_index"),
        stall_duration=1.9,
    )
    OtelEventSink(provider).emit(event)
    (record,) = [r.log_record for r in exporter.get_finished_logs()]
    assert record.event_name == CONNECTION_CLOSED_EVENT == "websocket.connection.closed"
    attributes = dict(record.attributes or {})
    assert attributes["websocket.close.code"] == 1011
    assert attributes["websocket.close.reason"] == "keepalive"
    assert attributes["http.route"] == "/feed"
    assert attributes["websocket.receive.queue.size"] == 3
    assert attributes["code.line.number"] == 41
    assert "blocked for 1900 ms by app.py:41" in str(record.body)
    provider.shutdown()
