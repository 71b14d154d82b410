"""OpenTelemetry: the instrumentor, stalls as log-based events in their trace, SDK set-up.

This module owns loopguard's meeting with an OpenTelemetry SDK (the ``otel`` extra):

- :class:`LoopguardInstrumentor`, found by ``opentelemetry-instrument`` through the
  ``opentelemetry_instrumentor`` entry point ``loopguard``: it installs the watchdog
  with options from ``OTEL_PYTHON_LOOPGUARD_*`` (or ``--loopguard_*`` flags; the
  ``LOOPGUARD_*`` variables keep working), and sends each stall and blocking call as
  a log record in the trace context of the task that was blocked.
- :func:`configure`: a console, OTLP or Prometheus set-up for applications that have
  none, which never replaces a provider the application set.

The options are :class:`~loopguard.Config`'s own (:func:`~loopguard.Config.from_env`):
each ``LOOPGUARD_NAME`` variable has an ``OTEL_PYTHON_LOOPGUARD_NAME`` twin, which
wins when both are set. Every twin is also an attribute of this module, which is how
``opentelemetry-instrument`` turns them into flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from opentelemetry import _logs as otel_logs
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from . import _api, metrics
from ._core.attribution import TRACE_PARENT, attribute, unattribute
from ._version import __version__
from ._watchdog import ENV_PREFIX, Config, Watchdog, env_options
from .events import BlockingCall, ConnectionClosed, Event, Frame, Stall
from .sinks import format_blocking_call, format_stall

__all__ = [
    "BLOCKING_CALL_EVENT",
    "CONNECTION_CLOSED_EVENT",
    "ENV_PREFIX_OTEL",
    "STALL_EVENT",
    "LoopguardInstrumentor",
    "OtelEventSink",
    "config_from_env",
    "configure",
    "configure_from_cli",
    "host_port",
]

logger = logging.getLogger("loopguard")

STALL_EVENT = "asyncio.eventloop.stall"
"""Event name of the log record sent for each stall."""
BLOCKING_CALL_EVENT = "asyncio.blocking_call"
"""Event name of the log record sent for each reported blocking call."""
CONNECTION_CLOSED_EVENT = "websocket.connection.closed"
"""Event name of the log record sent when the WebSocket guard explains a close."""
ENV_PREFIX_OTEL = "OTEL_PYTHON_LOOPGUARD_"
"""Prefix of the OpenTelemetry-style twin of each ``LOOPGUARD_*`` variable."""

# One module attribute per option: ``opentelemetry-instrument`` makes a
# ``--loopguard_<name>`` flag of every ``OTEL_*`` attribute of this module.
for _option in env_options():
    globals()[ENV_PREFIX_OTEL + _option.name.upper()] = ENV_PREFIX_OTEL + _option.name.upper()
del _option


def config_from_env(environ: Mapping[str, str] | None = None) -> Config:
    """The watchdog's options from ``LOOPGUARD_*`` and ``OTEL_PYTHON_LOOPGUARD_*``.

    Args:
        environ: The environment (default ``os.environ``).

    Returns:
        The :class:`~loopguard.Config`; an ``OTEL_PYTHON_LOOPGUARD_NAME`` variable
        wins over ``LOOPGUARD_NAME``.

    Raises:
        ValueError: A variable is unknown or has an invalid value; the message
            names the variable as it was set.
    """
    env = os.environ if environ is None else environ
    merged = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    twins: dict[str, str] = {}  # LOOPGUARD_NAME -> OTEL_PYTHON_LOOPGUARD_NAME
    for key, value in env.items():
        if key.startswith(ENV_PREFIX_OTEL):
            name = ENV_PREFIX + key[len(ENV_PREFIX_OTEL) :]
            merged[name] = value
            twins[name] = key
    try:
        return Config.from_env(merged)
    except ValueError as exc:
        message = str(exc)
        for name, key in twins.items():
            message = message.replace(f"variable {name};", f"variable {key};")
            message = message.replace(f"{name}=", f"{key}=")
        given = [f"{key}={env[key]!r}" for key in sorted(twins.values())]
        if given and not any(key in message for key in twins.values()):
            message += f" (set by {', '.join(given)})"
        raise ValueError(message) from None


def _traceparent(context: Any) -> str | None:
    """The current span of an OpenTelemetry context as W3C ``traceparent`` text."""
    span = otel_trace.get_current_span(context)
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _context_var() -> Any:
    """The ContextVar in which OpenTelemetry keeps the current context, if it uses one."""
    from opentelemetry import context as otel_context

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    return getattr(runtime, "_current_context", None)


def _code(frame: Frame | None) -> dict[str, Any]:
    if frame is None:
        return {}
    return {
        "code.function.name": frame.function,
        "code.file.path": frame.file,
        "code.line.number": frame.line,
    }


def _stacktrace(frames: tuple[Frame, ...]) -> str:
    """Frames, outermost first, in the shape of a Python traceback."""
    lines = ["Traceback (most recent call last):"]
    lines += [f'  File "{f.file}", line {f.line}, in {f.function}' for f in frames]
    return "\n".join(lines)


def _user_attributes(attributes: Mapping[str, str]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if k not in (TRACE_PARENT, "task.name")}


class OtelEventSink:
    """Sends stalls and blocking calls as OpenTelemetry log records (events).

    Each record is emitted in the trace context of the task that was blocked (read
    when the stall began, or when the call was made), so its ``trace_id`` and
    ``span_id`` are those of the request it slowed down. Use a batching log
    processor: the sink runs on loopguard's sampler thread.

    Args:
        logger_provider: Where to send them; ``None``: the global one.
    """

    def __init__(self, logger_provider: Any = None) -> None:
        provider = logger_provider or otel_logs.get_logger_provider()
        self._logger = provider.get_logger("loopguard", __version__)

    def emit(self, event: Event) -> None:
        """Send a stall, a blocking call or a WebSocket close; other events are left out."""
        if isinstance(event, Stall):
            self._emit_stall(event)
        elif isinstance(event, BlockingCall):
            self._emit_call(event)
        elif isinstance(event, ConnectionClosed):
            self._emit_closed(event)

    def _emit_closed(self, closed: ConnectionClosed) -> None:
        attributes: dict[str, Any] = {
            **_code(closed.stall),  # the line that held the loop during the last ping window
            "websocket.close.code": closed.code,
            "websocket.close.reason": closed.reason,
            metrics.WEBSOCKET_RECEIVE_QUEUE_SIZE: closed.depth,
            metrics.WEBSOCKET_RECEIVE_QUEUE_CAPACITY: closed.maxsize,
            metrics.WEBSOCKET_RECEIVE_LAG: closed.lag,
            "websocket.receive.delivered": closed.delivered,
            "websocket.receive.dropped": closed.dropped,
        }
        optional = {
            "http.route": closed.route,
            "websocket.receive.queue.full_since": closed.full_since,
            "websocket.ping.rtt": closed.ping_rtt,
            metrics.EVENTLOOP_STALL_DURATION: closed.stall_duration,
        }
        attributes.update({k: v for k, v in optional.items() if v is not None})
        self._send(
            CONNECTION_CLOSED_EVENT,
            time.time(),
            otel_logs.SeverityNumber.WARN,
            str(closed),
            attributes,
            None,
        )

    def _emit_stall(self, stall: Stall) -> None:
        attributes: dict[str, Any] = {
            **_user_attributes(stall.attributes),
            **_code(stall.culprit),
            metrics.EVENTLOOP_STALL_DURATION: stall.duration,  # the value the histogram gets
            metrics.EVENTLOOP_STALL_CAUSE: stall.cause,
            "asyncio.eventloop.kind": stall.loop,
            "thread.name": stall.thread,
        }
        if stall.stacks:
            top = max(stall.stacks, key=lambda s: s.count)
            attributes["code.stacktrace"] = _stacktrace(top.frames)
        if stall.task:
            attributes["asyncio.eventloop.stall.task"] = stall.task
        if stall.blocking_call:
            attributes["asyncio.eventloop.stall.blocking_call"] = stall.blocking_call
        if stall.hog is not None:
            attributes["asyncio.eventloop.stall.hog"] = stall.hog.thread
        self._send(
            STALL_EVENT,
            stall.started_at,
            otel_logs.SeverityNumber.WARN,
            format_stall(stall, max_frames=0).splitlines()[0],
            attributes,
            metrics.trace_context(stall.attributes.get(TRACE_PARENT)),
        )

    def _emit_call(self, call: BlockingCall) -> None:
        attributes: dict[str, Any] = {
            **_user_attributes(call.attributes),
            **_code(call.culprit),
            "code.stacktrace": _stacktrace(call.stack),
            metrics.BLOCKING_CALL_FUNCTION: call.function,
            metrics.BLOCKING_CALL_ACTION: call.action,
            "asyncio.blocking_call.duration": call.duration,
            "asyncio.eventloop.kind": call.loop,
            "thread.name": call.thread,
        }
        refused = call.action == "raise"
        self._send(
            BLOCKING_CALL_EVENT,
            time.time() - call.duration,
            otel_logs.SeverityNumber.ERROR if refused else otel_logs.SeverityNumber.WARN,
            format_blocking_call(call, max_frames=0).splitlines()[0],
            attributes,
            metrics.trace_context(call.attributes.get(TRACE_PARENT)),
        )

    def _send(
        self,
        name: str,
        started: float,
        severity: otel_logs.SeverityNumber,
        body: str,
        attributes: dict[str, Any],
        context: Context | None,
    ) -> None:
        record = otel_logs.LogRecord(
            timestamp=int(started * 1e9),
            observed_timestamp=time.time_ns(),
            context=context if context is not None else Context(),
            severity_number=severity,
            severity_text=severity.name,
            body=body,
            attributes=attributes,
            event_name=name,
        )
        self._logger.emit(record)


class LoopguardInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Turns loopguard on under OpenTelemetry: ``opentelemetry-instrument`` finds it.

    ``instrument()`` installs the process-wide watchdog (or joins the one already
    installed) with options from the environment (:func:`config_from_env`), points
    loopguard's metrics at ``meter_provider``, records the trace context of the task
    a stall blocks, and sends stalls and blocking calls as events through
    ``logger_provider``. ``uninstrument()`` undoes all of it. Both are idempotent.

    Invalid options never stop the application: the error is logged, naming the
    variable, and loopguard stays off.

    Keyword arguments of ``instrument()``:
        meter_provider: For the metrics (default: the global one).
        logger_provider: For the events (default: the global one).
        tracer_provider: Accepted for symmetry with other instrumentors; loopguard
            makes no spans (a stall's trace is the blocked request's).
    """

    _lock = threading.Lock()

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing to instrument but the interpreter: no dependency to check."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        with self._lock:
            self._undo: list[Any] = []
            try:
                config = config_from_env()
            except ValueError as exc:
                logger.error("loopguard: %s; loopguard stays off", exc)
                return
            try:
                self._start(config, kwargs)
            except Exception as exc:
                logger.error("loopguard: could not start (%s); loopguard stays off", exc)
                self._stop()

    def _start(self, config: Config, kwargs: Mapping[str, Any]) -> None:
        meter_provider = kwargs.get("meter_provider")
        if meter_provider is not None:
            metrics.use_meter_provider(meter_provider)
            self._undo.append(lambda: metrics.use_meter_provider(None))
        var = _context_var()
        if var is not None:
            attribute(TRACE_PARENT, var, _traceparent)
            self._undo.append(lambda: unattribute(TRACE_PARENT))
        sink = OtelEventSink(kwargs.get("logger_provider"))
        running = _api.current()
        if running is None:
            _api.install_config(replace(config, sinks=(*config.sinks, sink)))
            self._undo.append(_api.uninstall)
        else:
            self._undo.append(_attach(running, sink))

    def _uninstrument(self, **kwargs: Any) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        undo, self._undo = getattr(self, "_undo", []), []
        for step in reversed(undo):
            try:
                step()
            except Exception:
                logger.exception("loopguard: undoing the OpenTelemetry set-up failed")


def _attach(wd: Watchdog, sink: OtelEventSink) -> Any:
    """Add a sink to a watchdog already running; return how to take it off."""
    wd.sinks.sinks.append(sink)

    def detach() -> None:
        with contextlib.suppress(ValueError):
            wd.sinks.sinks.remove(sink)

    return detach


def _is_unset(provider: object) -> bool:
    """True for the API's placeholder providers (nothing set by the application)."""
    return type(provider).__name__ in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
        "ProxyLoggerProvider",
        "NoOpLoggerProvider",
    )


def configure(
    *,
    console: bool = False,
    otlp: str | bool = False,
    prometheus: str | None = None,
    export_interval: float = 10.0,
) -> LoopguardInstrumentor:
    """Set up an OpenTelemetry SDK for loopguard, then instrument.

    For applications without an SDK set-up of their own. A provider the application
    already set (metrics or logs) is kept as it is and used; only missing ones are
    created and set globally.

    Args:
        console: Print metrics and events on stdout (for trying things out).
        otlp: Send metrics and events over OTLP/HTTP: ``True`` for the endpoint of
            the ``OTEL_EXPORTER_OTLP_*`` variables (default ``localhost:4318``), or
            a base URL such as ``"http://collector:4318"``.
        prometheus: ``"HOST:PORT"`` to serve metrics for Prometheus to scrape.
        export_interval: Seconds between metric exports to the console or OTLP.

    Returns:
        The instrumentor (already instrumented).

    Raises:
        ValueError: ``prometheus`` is not ``HOST:PORT``, or no output was chosen.
        ImportError: The exporter's package is not installed (the message names it).
    """
    if not (console or otlp or prometheus):
        raise ValueError("configure(): choose an output: console, otlp or prometheus")
    try:
        address = host_port(prometheus) if prometheus else None
    except ValueError as exc:
        raise ValueError(f"prometheus: {exc}") from None
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    interval_ms = export_interval * 1000
    if _is_unset(otel_metrics.get_meter_provider()):
        readers: list[MetricReader] = []
        if console:
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), interval_ms))
        if otlp:
            readers.append(PeriodicExportingMetricReader(_otlp_metrics(otlp), interval_ms))
        if address is not None:
            readers.append(_prometheus(*address))
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=readers))
    else:
        logger.warning(
            "loopguard.otel.configure(): the application set a MeterProvider; "
            "loopguard reports to it and adds no exporter of its own"
        )
    if (console or otlp) and _is_unset(otel_logs.get_logger_provider()):
        provider = LoggerProvider()
        if console:
            from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

            provider.add_log_record_processor(BatchLogRecordProcessor(ConsoleLogRecordExporter()))
        if otlp:
            provider.add_log_record_processor(BatchLogRecordProcessor(_otlp_logs(otlp)))
        otel_logs.set_logger_provider(provider)
    instrumentor = LoopguardInstrumentor()
    instrumentor.instrument()
    return instrumentor


def host_port(text: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (an empty host: every interface).

    Raises:
        ValueError: The text is not ``HOST:PORT`` with a port from 0 to 65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


def configure_from_cli() -> None:
    """What ``loopguard run --otel`` / ``--prometheus HOST:PORT`` do in each process.

    Never raises: a failure (a missing exporter package, a port in use) is written
    on stderr and the program runs on with the watchdog alone.
    """
    try:
        configure(
            otlp=bool(os.environ.get(ENV_PREFIX + "OTEL")),
            prometheus=os.environ.get(ENV_PREFIX + "PROMETHEUS") or None,
        )
    except Exception as exc:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"loopguard: OpenTelemetry outputs not started: {exc}\n")


def _endpoint(otlp: str | bool, signal: str) -> str | None:
    return None if otlp is True else f"{str(otlp).rstrip('/')}/v1/{signal}"


def _missing(what: str, package: str, exc: ImportError) -> ImportError:
    return ImportError(f"configure({what}) needs the package {package} ({exc})")


def _otlp_metrics(otlp: str | bool) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise _missing("otlp=...", "opentelemetry-exporter-otlp-proto-http", exc) from None
    return OTLPMetricExporter(endpoint=_endpoint(otlp, "metrics"))


def _otlp_logs(otlp: str | bool) -> Any:
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    return OTLPLogExporter(endpoint=_endpoint(otlp, "logs"))


def _prometheus(host: str, port: int) -> Any:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise _missing("prometheus=...", "opentelemetry-exporter-prometheus", exc) from None
    start_http_server(port, addr=host)
    return PrometheusMetricReader()
