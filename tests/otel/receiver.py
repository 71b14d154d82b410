"""A small OTLP/HTTP receiver for tests: decodes what the real exporters send.

It plays the part of a collector: the application under test runs the real OTLP/HTTP
exporters, and the test reads the decoded protobuf messages (logs, spans, metrics).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_MESSAGES: dict[str, Any] = {
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}


def value_of(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes_of(item: Any) -> dict[str, Any]:
    """An OTLP message's ``attributes`` as a dict."""
    return {kv.key: value_of(kv.value) for kv in item.attributes}


@dataclass
class Received:
    """Everything the receiver decoded, by signal."""

    logs: list[ExportLogsServiceRequest]
    traces: list[ExportTraceServiceRequest]
    metrics: list[ExportMetricsServiceRequest]

    def log_records(self) -> Iterator[Any]:
        """Every log record received."""
        for request in self.logs:
            for resource in request.resource_logs:
                for scope in resource.scope_logs:
                    yield from scope.log_records

    def spans(self) -> Iterator[Any]:
        """Every span received."""
        for request in self.traces:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    yield from scope.spans

    def events(self, name: str) -> list[Any]:
        """The log records with this event name."""
        return [r for r in self.log_records() if r.event_name == name]


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) endpoint on 127.0.0.1; ``endpoint`` is its base URL."""

    def __init__(self) -> None:
        self.received = Received([], [], [])
        self.errors: list[str] = []
        lock = threading.Lock()
        received, errors = self.received, self.errors

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                message = _MESSAGES.get(self.path)
                if message is None:
                    errors.append(f"unexpected path {self.path}")
                    self.send_response(404)
                    self.end_headers()
                    return
                request = message()
                request.ParseFromString(body)
                with lock:
                    getattr(received, self.path.rsplit("/", 1)[1]).append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """Base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
