"""Every OpenTelemetry instrument loopguard reports, and the only place that names one.

This module owns the metric table: name, instrument kind, unit, description, the
attribute keys each metric may carry (a closed, bounded set) and histogram bucket
advice. Other modules refer to metrics through the name constants below and report
through :func:`record` (synchronous instruments) or :func:`observe` (instruments read
at collection time); they never call OpenTelemetry themselves.

Only the OpenTelemetry *API* is used: with no SDK configured every instrument is a
no-op and recording costs a method call. Instruments are created lazily, on first use,
from ``opentelemetry.metrics.get_meter("loopguard", <version>)``; the SDK, exporters
and views are the application's choice. :func:`use_meter_provider` points loopguard at
a specific ``MeterProvider`` instead of the global one (tests, or applications that
keep several providers).

Reporting never raises into the caller: an instrument that fails is logged once and
replaced by a no-op.

To add a metric: add a name constant and a :class:`MetricSpec` to :data:`SPECS`, then
call :func:`record` or :func:`observe` with the constant.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context

__all__ = [
    "ASYNCIO_BLOCKING_CALLS",
    "BLOCKING_CALL_ACTION",
    "BLOCKING_CALL_FUNCTION",
    "EVENTLOOP_DELAY",
    "EVENTLOOP_PENDING_CALLBACKS",
    "EVENTLOOP_SLOW_CALLBACKS",
    "EVENTLOOP_STALLS",
    "EVENTLOOP_STALL_CAUSE",
    "EVENTLOOP_STALL_DURATION",
    "EVENTLOOP_STATE",
    "EVENTLOOP_TASKS",
    "EVENTLOOP_TIME",
    "EVENTLOOP_UTILIZATION",
    "METER_NAME",
    "OFFLOAD_ACTIVE",
    "OFFLOAD_FUNCTION",
    "OFFLOAD_MODE",
    "OFFLOAD_RUN_DURATION",
    "OFFLOAD_WAIT_DURATION",
    "SPECS",
    "ASGI_SHED",
    "ASGI_SHED_REASON",
    "WEBSOCKET_CLOSES",
    "WEBSOCKET_CONNECTION_ACTIVE",
    "WEBSOCKET_PING_DURATION",
    "WEBSOCKET_PROCESS_DURATION",
    "WEBSOCKET_RECEIVE_LAG",
    "WEBSOCKET_RECEIVE_MESSAGES",
    "WEBSOCKET_RECEIVE_QUEUE_CAPACITY",
    "WEBSOCKET_RECEIVE_QUEUE_SIZE",
    "WEBSOCKET_RECEIVE_TIME_IN_QUEUE",
    "BROADCAST_BACKPLANE_ERRORS",
    "BROADCAST_BACKPLANE_LAG",
    "BROADCAST_BACKPLANE_LOST",
    "BROADCAST_BACKPLANE_RECONNECTS",
    "BROADCAST_EVICTIONS",
    "BROADCAST_FANOUT_DURATION",
    "BROADCAST_MEMBER_COUNT",
    "BROADCAST_MESSAGES",
    "BROADCAST_QUEUE_SIZE",
    "BROADCAST_SUBSCRIBER_COUNT",
    "InstrumentKind",
    "MetricSpec",
    "instrument",
    "observe",
    "record",
    "trace_context",
    "use_meter_provider",
]

logger = logging.getLogger("loopguard")

METER_NAME = "loopguard"
"""Instrumentation scope name of every loopguard instrument."""

InstrumentKind = Literal["counter", "updowncounter", "histogram", "gauge"]

# -- names ---------------------------------------------------------------------------
# Event loop (mirrors Node's nodejs.eventloop.* semantic conventions).
EVENTLOOP_DELAY = "asyncio.eventloop.delay"
EVENTLOOP_UTILIZATION = "asyncio.eventloop.utilization"
EVENTLOOP_TIME = "asyncio.eventloop.time"
EVENTLOOP_STALLS = "asyncio.eventloop.stall.count"
EVENTLOOP_STALL_DURATION = "asyncio.eventloop.stall.duration"
EVENTLOOP_SLOW_CALLBACKS = "asyncio.eventloop.slow_callback.count"
EVENTLOOP_PENDING_CALLBACKS = "asyncio.eventloop.callback.pending"
EVENTLOOP_TASKS = "asyncio.eventloop.task.count"
ASYNCIO_BLOCKING_CALLS = "asyncio.blocking_call.count"
# Offload.
OFFLOAD_WAIT_DURATION = "loopguard.offload.wait.duration"
OFFLOAD_RUN_DURATION = "loopguard.offload.run.duration"
OFFLOAD_ACTIVE = "loopguard.offload.active"
# Attribute keys, each under its metric's namespace (OpenTelemetry naming rules).
EVENTLOOP_STATE = "asyncio.eventloop.state"
EVENTLOOP_STALL_CAUSE = "asyncio.eventloop.stall.cause"
BLOCKING_CALL_FUNCTION = "asyncio.blocking_call.function"
BLOCKING_CALL_ACTION = "asyncio.blocking_call.action"
OFFLOAD_MODE = "loopguard.offload.mode"
OFFLOAD_FUNCTION = "loopguard.offload.function"
# Guarded WebSocket receive (loopguard_integrations): every attribute is under the
# metric's namespace or a registered one (http.route, error.type), values bounded.
WEBSOCKET_RECEIVE_QUEUE_SIZE = "websocket.receive.queue.size"
WEBSOCKET_RECEIVE_QUEUE_CAPACITY = "websocket.receive.queue.capacity"
WEBSOCKET_RECEIVE_TIME_IN_QUEUE = "websocket.receive.time_in_queue"
WEBSOCKET_RECEIVE_MESSAGES = "websocket.receive.message.count"
WEBSOCKET_RECEIVE_LAG = "websocket.receive.lag"
WEBSOCKET_PROCESS_DURATION = "websocket.process.duration"
WEBSOCKET_CONNECTION_ACTIVE = "websocket.connection.active"
WEBSOCKET_PING_DURATION = "websocket.ping.duration"
WEBSOCKET_CLOSES = "websocket.close.count"
# ASGI middleware (loopguard_integrations.asgi): load shedding.
ASGI_SHED = "loopguard.asgi.shed.count"
ASGI_SHED_REASON = "loopguard.asgi.shed.reason"  # "delay" or "utilization"
# Broadcast (loopguard_integrations.broadcast).
BROADCAST_SUBSCRIBER_COUNT = "broadcast.subscriber.count"
BROADCAST_MEMBER_COUNT = "broadcast.group.member.count"
BROADCAST_QUEUE_SIZE = "broadcast.queue.size"
BROADCAST_MESSAGES = "broadcast.message.count"
BROADCAST_EVICTIONS = "broadcast.eviction.count"
BROADCAST_FANOUT_DURATION = "broadcast.fanout.duration"
BROADCAST_BACKPLANE_LAG = "broadcast.backplane.lag"
BROADCAST_BACKPLANE_RECONNECTS = "broadcast.backplane.reconnect.count"
BROADCAST_BACKPLANE_ERRORS = "broadcast.backplane.error.count"
BROADCAST_BACKPLANE_LOST = "broadcast.backplane.lost.count"

# Bucket advice for histograms in seconds. The SDK's default boundaries (0, 5, 10,
# 25, ... 10000) suit milliseconds and would put every loop delay in one bucket.
_LOOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CALL_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True)
class MetricSpec:
    """What one metric is: the single source of its name, kind, unit and attributes.

    Attributes:
        name: The metric name.
        kind: Instrument kind: ``"counter"``, ``"updowncounter"``, ``"histogram"`` or
            ``"gauge"``. :func:`record` uses the synchronous instrument of that kind;
            :func:`observe` the asynchronous (observable) one.
        unit: UCUM unit (``"s"``, ``"1"``, ``"{call}"``...).
        description: One line for dashboards.
        attributes: The only attribute keys the metric may carry. Each has a small,
            fixed set of values, so the metric's cardinality stays bounded.
        buckets: Explicit bucket boundaries advised to the SDK (histograms only).
    """

    name: str
    kind: InstrumentKind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


_OFFLOAD_ATTRIBUTES = (OFFLOAD_MODE, OFFLOAD_FUNCTION)
# The route template (never the raw path): the only attribute every WebSocket metric has.
_WEBSOCKET_ATTRIBUTES = ("http.route",)

SPECS: Mapping[str, MetricSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            MetricSpec(
                EVENTLOOP_DELAY,
                "histogram",
                "s",
                "How late the event loop ran a timer it was asked to run on time.",
                buckets=_LOOP_BUCKETS,
            ),
            MetricSpec(
                EVENTLOOP_UTILIZATION,
                "gauge",
                "1",
                "Share of wall time the event loop spent running callbacks, not waiting.",
            ),
            MetricSpec(
                EVENTLOOP_TIME,
                "counter",
                "s",
                "Time the event loop spent active (running callbacks) or idle (waiting).",
                attributes=(EVENTLOOP_STATE,),
            ),
            MetricSpec(
                EVENTLOOP_STALLS,
                "counter",
                "{stall}",
                "Stalls: the loop was held for at least the threshold.",
                attributes=(EVENTLOOP_STALL_CAUSE,),
            ),
            MetricSpec(
                EVENTLOOP_STALL_DURATION,
                "histogram",
                "s",
                "How long each stall held the event loop.",
                buckets=_LOOP_BUCKETS,
            ),
            MetricSpec(
                EVENTLOOP_SLOW_CALLBACKS,
                "counter",
                "{callback}",
                "Callbacks that ran longer than the slow-callback threshold.",
            ),
            MetricSpec(
                EVENTLOOP_PENDING_CALLBACKS,
                "gauge",
                "{callback}",
                "Callbacks ready to run, waiting for the event loop.",
            ),
            MetricSpec(EVENTLOOP_TASKS, "gauge", "{task}", "Tasks alive on the event loop."),
            MetricSpec(
                ASYNCIO_BLOCKING_CALLS,
                "counter",
                "{call}",
                "Blocking calls made on the event loop thread, by catalogued function.",
                attributes=(BLOCKING_CALL_FUNCTION, BLOCKING_CALL_ACTION),
            ),
            MetricSpec(
                OFFLOAD_WAIT_DURATION,
                "histogram",
                "s",
                "Time an offloaded call waited for a worker (limit, pool, transfer).",
                attributes=_OFFLOAD_ATTRIBUTES,
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                OFFLOAD_RUN_DURATION,
                "histogram",
                "s",
                "Time an offloaded call ran on its worker.",
                attributes=_OFFLOAD_ATTRIBUTES,
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                OFFLOAD_ACTIVE,
                "updowncounter",
                "{call}",
                "Offloaded calls in progress (waiting for a worker or running).",
                attributes=_OFFLOAD_ATTRIBUTES,
            ),
            MetricSpec(
                WEBSOCKET_RECEIVE_QUEUE_SIZE,
                "updowncounter",
                "{message}",
                "Messages received and queued, not yet taken by the consumer.",
                attributes=_WEBSOCKET_ATTRIBUTES,
            ),
            MetricSpec(
                WEBSOCKET_RECEIVE_QUEUE_CAPACITY,
                "updowncounter",
                "{message}",
                "Messages the receive queues of the open connections can hold (maxsize).",
                attributes=_WEBSOCKET_ATTRIBUTES,
            ),
            MetricSpec(
                WEBSOCKET_RECEIVE_TIME_IN_QUEUE,
                "histogram",
                "s",
                "Time a received message waited in the queue before the consumer took it.",
                attributes=_WEBSOCKET_ATTRIBUTES,
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                WEBSOCKET_RECEIVE_MESSAGES,
                "counter",
                "{message}",
                "Messages received, by outcome (delivered or dropped, with the reason).",
                attributes=(
                    *_WEBSOCKET_ATTRIBUTES,
                    "websocket.receive.message.outcome",
                    "error.type",
                ),
            ),
            MetricSpec(
                WEBSOCKET_RECEIVE_LAG,
                "gauge",
                "s",
                "Age of the oldest message still queued: how far the consumer is behind.",
                attributes=_WEBSOCKET_ATTRIBUTES,
            ),
            MetricSpec(
                WEBSOCKET_PROCESS_DURATION,
                "histogram",
                "s",
                "Time the consumer spent on one message (or one batch) before asking for more.",
                attributes=_WEBSOCKET_ATTRIBUTES,
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                WEBSOCKET_CONNECTION_ACTIVE,
                "updowncounter",
                "{connection}",
                "Guarded WebSocket connections open now.",
                attributes=_WEBSOCKET_ATTRIBUTES,
            ),
            MetricSpec(
                WEBSOCKET_PING_DURATION,
                "histogram",
                "s",
                "Round-trip time of WebSocket pings (ping sent to pong received).",
                attributes=_WEBSOCKET_ATTRIBUTES,
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                WEBSOCKET_CLOSES,
                "counter",
                "{connection}",
                "Guarded connections closed, by close code and by why they closed.",
                attributes=(
                    *_WEBSOCKET_ATTRIBUTES,
                    "websocket.close.code",
                    "websocket.close.reason",
                ),
            ),
            MetricSpec(
                ASGI_SHED,
                "counter",
                "{request}",
                "Requests refused with 503 by the ASGI middleware's load shedding.",
                attributes=(ASGI_SHED_REASON,),
            ),
            # Broadcast.
            MetricSpec(
                BROADCAST_SUBSCRIBER_COUNT,
                "updowncounter",
                "{subscriber}",
                "Broadcast subscribers (async with subscribe()) open now.",
            ),
            MetricSpec(
                BROADCAST_MEMBER_COUNT,
                "updowncounter",
                "{connection}",
                "WebSocket connections attached to broadcast groups now.",
            ),
            MetricSpec(
                BROADCAST_QUEUE_SIZE,
                "updowncounter",
                "{message}",
                "Messages queued for subscribers or connections, not yet read or sent.",
                attributes=("broadcast.queue.target",),
            ),
            MetricSpec(
                BROADCAST_MESSAGES,
                "counter",
                "{message}",
                "Messages handed to subscribers or connections, by outcome and drop reason.",
                attributes=(
                    "broadcast.message.target",
                    "broadcast.message.outcome",
                    "broadcast.message.drop_reason",
                ),
            ),
            MetricSpec(
                BROADCAST_EVICTIONS,
                "counter",
                "{eviction}",
                "Subscribers or connections closed for falling behind, by reason.",
                attributes=("broadcast.eviction.target", "broadcast.eviction.reason"),
            ),
            MetricSpec(
                BROADCAST_FANOUT_DURATION,
                "histogram",
                "s",
                "Time one publish took to hand a message to every local reader.",
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                BROADCAST_BACKPLANE_LAG,
                "histogram",
                "s",
                "Time from publish in another process to arrival here (wall clocks).",
                buckets=_CALL_BUCKETS,
            ),
            MetricSpec(
                BROADCAST_BACKPLANE_RECONNECTS,
                "counter",
                "{reconnect}",
                "Times the Redis pub/sub connection was re-established after a loss.",
            ),
            MetricSpec(
                BROADCAST_BACKPLANE_ERRORS,
                "counter",
                "{error}",
                "Backplane errors (lost connections, failed connects and publishes).",
                attributes=("error.type",),
            ),
            MetricSpec(
                BROADCAST_BACKPLANE_LOST,
                "counter",
                "{message}",
                "Messages other processes published that never arrived (sequence gaps).",
            ),
        )
    }
)
"""Every metric loopguard can report, by name."""

Attributes = Mapping[str, str | bool | int | float]
ObservableCallback = Callable[[], Iterable[tuple[float, Attributes | None]]]
"""Returns the current ``(value, attributes)`` pairs of an observed metric."""


class _Noop:
    """Stands in for an instrument that could not be created or has failed."""

    def add(self, *args: object, **kwargs: object) -> None:
        pass

    record = set = add


_NOOP = _Noop()

_lock = threading.Lock()
_provider: otel_metrics.MeterProvider | None = None
_meter: otel_metrics.Meter | None = None
# name -> bound "report" method (add / record / set) of the synchronous instrument.
_reporters: dict[str, Callable[..., None]] = {}
_instruments: dict[str, object] = {}
# The callback of each observed metric, and which have an instrument on the meter.
_observed: dict[str, ObservableCallback] = {}
_observing: set[str] = set()
_failed: set[str] = set()


def _version() -> str:
    try:
        from ._version import __version__
    except ImportError:  # pragma: no cover - loopguard/__init__ always defines it
        return ""
    return __version__


def _get_meter() -> otel_metrics.Meter:
    global _meter
    if _meter is None:
        _meter = otel_metrics.get_meter(METER_NAME, _version(), meter_provider=_provider)
    return _meter


def _spec(name: str) -> MetricSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(
            f"{name!r} is not a loopguard metric (see loopguard.metrics.SPECS)"
        ) from None


def _create(spec: MetricSpec) -> object:
    meter = _get_meter()
    if spec.kind == "counter":
        return meter.create_counter(spec.name, spec.unit, spec.description)
    if spec.kind == "updowncounter":
        return meter.create_up_down_counter(spec.name, spec.unit, spec.description)
    if spec.kind == "gauge":
        return meter.create_gauge(spec.name, spec.unit, spec.description)
    try:
        return meter.create_histogram(
            spec.name,
            spec.unit,
            spec.description,
            explicit_bucket_boundaries_advisory=spec.buckets,
        )
    except TypeError:  # an API older than the advisory parameter
        return meter.create_histogram(spec.name, spec.unit, spec.description)


def instrument(name: str) -> Any:
    """Return the synchronous instrument for a metric, creating it on first use.

    Args:
        name: One of the names in :data:`SPECS`.

    Returns:
        An OpenTelemetry ``Counter``, ``UpDownCounter``, ``Histogram`` or ``Gauge``
        (a no-op if it could not be created).

    Raises:
        KeyError: The name is not in :data:`SPECS` (a programming error).
    """
    inst = _instruments.get(name)
    if inst is None:
        spec = _spec(name)
        with _lock:
            inst = _instruments.get(name)
            if inst is None:
                try:
                    inst = _create(spec)
                except Exception:
                    _log_failure(name, "could not be created")
                    inst = _NOOP
                _instruments[name] = inst
    return inst


def _reporter(name: str) -> Callable[..., None]:
    inst = instrument(name)
    method = "record" if SPECS[name].kind == "histogram" else "add"
    if SPECS[name].kind == "gauge":
        method = "set"
    report: Callable[..., None] = getattr(inst, method, _NOOP.add)
    _reporters[name] = report
    return report


def record(
    name: str, value: float, attributes: Attributes | None = None, context: Context | None = None
) -> None:
    """Report one value to a synchronous instrument; never raises.

    Adds to a counter or up-down counter, records into a histogram, sets a gauge.

    Args:
        name: One of the names in :data:`SPECS`.
        value: The value (an increment for counters).
        attributes: Attributes, with keys from the metric's spec only.
        context: The OpenTelemetry context the value belongs to (its span becomes
            the exemplar's); ``None``: the calling thread's current context.
    """
    try:
        report = _reporters.get(name) or _reporter(name)
        if context is None:
            report(value, attributes)
        else:
            report(value, attributes, context)
    except Exception:
        _fail(name)


def trace_context(traceparent: str | None) -> Context | None:
    """The OpenTelemetry context of a span given in W3C ``traceparent`` form.

    Events carry the trace context of the task they blocked as text (see
    :mod:`loopguard.otel`); this turns it back into a context to record a value or
    emit a log record in, without the span object itself.

    Args:
        traceparent: ``"00-<trace id>-<span id>-<flags>"``, or ``None``.

    Returns:
        A context whose current span is a non-recording span with that trace id,
        span id and flags; ``None`` when there is none or the text is malformed.
    """
    if not traceparent:
        return None
    try:
        _, trace_id, span_id, flags = traceparent.split("-")
        span = otel_trace.NonRecordingSpan(
            otel_trace.SpanContext(
                int(trace_id, 16),
                int(span_id, 16),
                is_remote=False,
                trace_flags=otel_trace.TraceFlags(int(flags, 16)),
            )
        )
        if not span.get_span_context().is_valid:
            return None
        return otel_trace.set_span_in_context(span)
    except Exception:
        return None


def observe(name: str, callback: ObservableCallback | None) -> None:
    """Report a metric through a callback the SDK calls at each collection; never raises.

    Use it for values that already exist somewhere (a count kept by the caller, a
    queue's length): they cost nothing until the SDK collects. One callback per
    metric: observing a name again replaces its callback, ``None`` stops reporting
    it. The callback survives :func:`use_meter_provider`. A callback that raises is
    logged once and reports nothing for that collection.

    Args:
        name: One of the names in :data:`SPECS` (counter, updowncounter or gauge).
        callback: Called at each collection, from the SDK's thread; returns
            ``(value, attributes)`` pairs (absolute values, also for counters).

    Raises:
        KeyError: The name is not in :data:`SPECS` (a programming error).
        ValueError: The metric is a histogram, which has no observable form.
    """
    spec = _spec(name)
    if spec.kind == "histogram":
        raise ValueError(f"{name} is a histogram; histograms cannot be observed")
    with _lock:
        if callback is None:
            _observed.pop(name, None)
            return
        _observed[name] = callback
        if name not in _observing and _register_observable(spec):
            _observing.add(name)


def _register_observable(spec: MetricSpec) -> bool:
    name = spec.name

    def trampoline(options: otel_metrics.CallbackOptions) -> Iterable[otel_metrics.Observation]:
        callback = _observed.get(name)
        if callback is None:
            return []
        try:
            return [otel_metrics.Observation(value, attrs) for value, attrs in callback()]
        except Exception:
            _log_failure(name, "callback raised")
            return []

    try:
        meter = _get_meter()
        create = {
            "counter": meter.create_observable_counter,
            "updowncounter": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }[spec.kind]
        create(name, [trampoline], spec.unit, spec.description)
    except Exception:
        _log_failure(name, "could not be observed")
        return False
    return True


def use_meter_provider(provider: otel_metrics.MeterProvider | None) -> None:
    """Send loopguard's metrics to this ``MeterProvider`` (``None``: the global one).

    Instruments are created again on next use from the new provider; callbacks given
    to :func:`observe` are registered with it.

    Args:
        provider: An SDK ``MeterProvider``, or ``None`` to go back to
            ``opentelemetry.metrics.get_meter_provider()``.
    """
    global _provider, _meter
    with _lock:
        _provider = provider
        _meter = None
        _instruments.clear()
        _reporters.clear()
        _failed.clear()
        _observing.clear()
        for name in list(_observed):
            if _register_observable(SPECS[name]):
                _observing.add(name)


def _fail(name: str) -> None:
    # Replace the failing instrument so the hot path stops paying for the exception.
    _reporters[name] = _NOOP.add
    _log_failure(name, "raised; it is disabled")


def _log_failure(name: str, what: str) -> None:
    if name in _failed:
        return
    _failed.add(name)
    with contextlib.suppress(Exception):
        logger.exception("loopguard metric %s %s", name, what)
