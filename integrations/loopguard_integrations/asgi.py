"""ASGI middleware: stalls named by route, background tasks named, optional load shedding.

:class:`LoopguardMiddleware` wraps any ASGI application. For each HTTP request and
WebSocket it sets context variables registered with :func:`loopguard.attribute`, so a
stall or blocking call carries the attributes of the request whose task was running:

============================  ==========================================================
attribute                     value
============================  ==========================================================
``http.route``                the route template after routing (Starlette, FastAPI), e.g.
                              ``/items/{item_id}``; never the raw path; left out when no
                              route matched
``http.request.method``       ``GET``, ``POST``... (``_OTHER`` for anything else)
``background.function``       inside a Starlette/FastAPI background task: the function
                              it runs (the route above is the one that scheduled it)
============================  ==========================================================

Load shedding (off unless a limit is given): when the loop's heartbeat delay p99 or its
utilization over a sliding window (read with :func:`loopguard.loop_load`) passes a
limit, or the delay building up right now does (:func:`loopguard.loop_lag`), new HTTP
requests are answered ``503 Service Unavailable`` with ``Retry-After``
without reaching the application; exempt paths (health checks, metrics) always pass
and WebSocket handshakes are refused only if asked. The shedder fails open: if
anything in it goes wrong the request goes through. Shed requests are counted in
``loopguard.asgi.shed.count``.

The trace: with loopguard's OpenTelemetry instrumentor on (``loopguard.otel``), each
stall and blocking call also carries the trace context of the blocked request, read
from the task's context when the stall happens (no cost per request), and is emitted
inside that request's trace.

Stalls are only seen while a watchdog runs (``loopguard.install()``, ``loopguard run``
or the OpenTelemetry instrumentor); the middleware does not start one.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import loopguard
from loopguard import metrics

__all__ = [
    "BACKGROUND_ATTRIBUTE",
    "DEFAULT_EXEMPT_PATHS",
    "METHOD_ATTRIBUTE",
    "ROUTE_ATTRIBUTE",
    "LoopguardMiddleware",
]

logger = logging.getLogger("loopguard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTE_ATTRIBUTE = "http.route"
METHOD_ATTRIBUTE = "http.request.method"
BACKGROUND_ATTRIBUTE = "background.function"

#: Paths never shed: health checks and metrics scrapes must see the overloaded service.
DEFAULT_EXEMPT_PATHS: tuple[str, ...] = (
    "/health",
    "/healthz",
    "/livez",
    "/readyz",
    "/ready",
    "/metrics",
)

_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def _route(scope: Scope) -> str | None:
    """The route template of a request, or ``None`` when no route matched (yet).

    Starlette's router writes the matched route into the scope after this middleware
    has run, so the template is looked up lazily, when a stall asks for it (on the
    sampler thread). The context variable holds the scope itself: a request costs one
    ``set`` and no allocation.
    """
    route = scope.get("route")
    template = route if isinstance(route, str) else getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    # Under a Starlette Mount the template is relative to the mount point: the mount's
    # path is what root_path gained below the application's own (app_root_path).
    root, top = scope.get("root_path", ""), scope.get("app_root_path")
    if isinstance(root, str) and isinstance(top, str) and root.startswith(top):
        template = root[len(top) :] + template
    return template


def _method(scope: Scope) -> str:
    """The request method, ``_OTHER`` for a method outside the standard set."""
    method = scope.get("method", "GET")
    return method if method in _METHODS else "_OTHER"


_REQUEST: contextvars.ContextVar[Scope] = contextvars.ContextVar("loopguard_asgi_request")
_BACKGROUND: contextvars.ContextVar[str] = contextvars.ContextVar("loopguard_background")

_ATTRIBUTES: tuple[tuple[str, contextvars.ContextVar[Any], Callable[[Any], str | None]], ...] = (
    (ROUTE_ATTRIBUTE, _REQUEST, _route),
    (METHOD_ATTRIBUTE, _REQUEST, _method),
    (BACKGROUND_ATTRIBUTE, _BACKGROUND, str),
)
_users_lock = threading.Lock()
_users = 0  # middlewares not closed: the attributes stay registered while there are any


def _register() -> None:
    global _users
    with _users_lock:
        _users += 1
        for name, var, convert in _ATTRIBUTES:
            loopguard.attribute(name, var, convert)


def _unregister() -> None:
    global _users
    with _users_lock:
        _users = max(0, _users - 1)
        if not _users:
            for name, _, _ in _ATTRIBUTES:
                loopguard.unattribute(name)


# -- background tasks ---------------------------------------------------------------
# Starlette runs a response's background tasks in the request's own task after the
# body is sent, so the request's attributes are still set; what is missing is *which*
# function runs. BackgroundTask.__call__ is wrapped while a middleware lives (counted)
# to name it; the wrapper is removed by the last LoopguardMiddleware.close(), and only
# if it is still the attribute in place.

_patch_lock = threading.Lock()
_patch_users = 0
_patched: tuple[type, Callable[..., Any], Callable[..., Any]] | None = None


def _function_name(func: object) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is None:
        name = type(func).__qualname__
    return f"{module}.{name}" if module else str(name)


def _patch_background() -> bool:
    global _patch_users, _patched
    try:
        from starlette.background import BackgroundTask
    except ImportError:
        return False
    with _patch_lock:
        _patch_users += 1
        if _patched is None:
            original = BackgroundTask.__call__

            async def __call__(self: Any) -> None:
                try:
                    token = _BACKGROUND.set(_function_name(self.func))
                except Exception:
                    token = None
                try:
                    await original(self)
                finally:
                    if token is not None:
                        _BACKGROUND.reset(token)

            __call__.__qualname__ = original.__qualname__
            __call__.__doc__ = original.__doc__
            BackgroundTask.__call__ = __call__  # type: ignore[method-assign]
            _patched = (BackgroundTask, original, __call__)
    return True


def _unpatch_background() -> None:
    global _patch_users, _patched
    with _patch_lock:
        _patch_users = max(0, _patch_users - 1)
        if _patch_users or _patched is None:
            return
        cls, original, wrapper = _patched
        _patched = None
        if cls.__dict__.get("__call__") is wrapper:
            cls.__call__ = original  # type: ignore[method-assign]


# -- shedding -----------------------------------------------------------------------


def _positive(name: str, value: object, *, upper: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
        or (upper is not None and value > upper)
    ):
        bound = f" and at most {upper:g}" if upper is not None else ""
        raise ValueError(f"{name} must be a number greater than 0{bound}, got {value!r}")
    return float(value)


# A p99 limit allows this share of arrivals to wait longer than it.
_P99_SHARE = 0.01


class _Shedder:
    """Decides, from a cached loop-load reading, whether a new request is refused."""

    __slots__ = (
        "check_every",
        "delay_p99",
        "next_check",
        "reason",
        "utilization",
        "warned",
        "window",
    )

    def __init__(
        self,
        delay_p99: float | None,
        utilization: float | None,
        window: float,
        check_every: float,
    ) -> None:
        self.delay_p99 = delay_p99
        self.utilization = utilization
        self.window = window
        self.check_every = check_every
        self.next_check = 0.0
        self.reason: str | None = None  # why requests are being shed now, None if not
        self.warned = False

    def overloaded(self) -> str | None:
        """The reason to shed (``"delay"``, ``"utilization"``), or ``None``.

        The window's percentiles and utilization are read every ``check_every``
        seconds; the delay building up right now (:func:`loopguard.loop_lag`) on every
        request, so a burst of requests that arrived together is cut short before
        the heartbeat has had a chance to run.
        """
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + self.check_every
            self.reason = self._windowed()
        if self.reason is not None:
            return self.reason
        if self.delay_p99 is not None:
            lag = loopguard.loop_lag()
            if lag is not None and lag > self.delay_p99:
                return "delay"
        return None

    def _windowed(self) -> str | None:
        load = loopguard.loop_load(self.window)
        if load is None:
            self._warn("no running watchdog watches this loop (call loopguard.install())")
            return None
        # The wait a request arriving at a random moment sees (time-weighted), not the
        # heartbeats' own percentile: a short stall several times a second leaves the
        # latter low while a few percent of requests wait the whole stall. And before
        # the limit is crossed, not after: a request is admitted only if one more
        # stretch as long as the longest of the window would keep the p99 under it
        # (admitting up to the limit lets one request push the p99 far past it).
        if self.delay_p99 is not None and load.held:
            longest = load.held[0]
            if load.wait_share(self.delay_p99, extra=longest) > _P99_SHARE:
                return "delay"
        if self.utilization is not None:
            if load.utilization is None:
                self._warn("loop utilization is not measured (install(stats=True))")
            elif load.utilization > self.utilization:
                return "utilization"
        return None

    def _warn(self, what: str) -> None:
        if not self.warned:
            self.warned = True
            logger.warning("loopguard: load shedding is inactive: %s", what)


class LoopguardMiddleware:
    """Wrap an ASGI application: stalls attributed to requests, optional load shedding.

    Example:
        ```python
        app = FastAPI()
        app.add_middleware(LoopguardMiddleware, shed_delay_p99=0.2)
        loopguard.install()
        ```

    Args:
        app: The ASGI application to wrap.
        background: Name the function of Starlette/FastAPI background tasks in the
            stalls they cause (wraps ``BackgroundTask.__call__`` until
            :meth:`close` or the application's lifespan shutdown).
        shed_delay_p99: Keep the p99 wait of a request arriving at a random moment
            (``LoopLoad.wait_p99`` over ``shed_window``) under this many seconds:
            shed new requests while one more stretch as long as the window's longest
            would push it over, or while the delay building up at the request's
            arrival exceeds it. Precise with loop statistics (``stats=True``, on
            asyncio's own loops); from heartbeats otherwise. ``None``: no delay limit.
        shed_utilization: Shed new requests while the loop's utilization over
            ``shed_window`` exceeds this share (0-1]; needs a watchdog with
            ``stats=True`` on asyncio's own loops. ``None``: no utilization limit.
            Answering a flood of refused requests keeps a loop busy too, so under
            such a flood this limit can keep shedding; the delay limit does not.
        shed_window: Seconds of history the limits are checked over (at most 60).
        shed_check_every: Seconds a load reading is reused for.
        retry_after: Seconds sent in the ``Retry-After`` header of a 503.
        exempt_paths: Paths (exact, or prefixes ending in ``/``) never shed.
        shed_websockets: Also refuse WebSocket handshakes while shedding (closed
            with code 1013, "try again later").

    Raises:
        ValueError: An argument is out of range (the message names it).
        TypeError: ``app`` is not callable.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        background: bool = True,
        shed_delay_p99: float | None = None,
        shed_utilization: float | None = None,
        shed_window: float = 2.0,
        shed_check_every: float = 0.1,
        retry_after: int = 1,
        exempt_paths: Sequence[str] = DEFAULT_EXEMPT_PATHS,
        shed_websockets: bool = False,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application (callable), got {app!r}")
        delay = None if shed_delay_p99 is None else _positive("shed_delay_p99", shed_delay_p99)
        utilization = (
            None
            if shed_utilization is None
            else _positive("shed_utilization", shed_utilization, upper=1.0)
        )
        window = _positive("shed_window", shed_window, upper=60.0)
        check_every = _positive("shed_check_every", shed_check_every)
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError(f"retry_after must be an int >= 0 (seconds), got {retry_after!r}")
        if isinstance(exempt_paths, str) or not all(
            isinstance(p, str) and p.startswith("/") for p in exempt_paths
        ):
            raise ValueError(
                f"exempt_paths must be a sequence of paths starting with '/', got {exempt_paths!r}"
            )
        self.app = app
        self.exempt_paths = tuple(exempt_paths)
        self._exempt = frozenset(exempt_paths)
        self._exempt_under = tuple(p for p in exempt_paths if p.endswith("/"))
        self.shed_websockets = bool(shed_websockets)
        self.retry_after = retry_after
        self._shedder = (
            _Shedder(delay, utilization, window, check_every)
            if delay is not None or utilization is not None
            else None
        )
        self._headers = [
            (b"retry-after", str(retry_after).encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"19"),
        ]
        _register()
        self._open = True
        self._patched = bool(background) and _patch_background()

    def close(self) -> None:
        """Stop attributing; idempotent, called at the application's lifespan shutdown.

        The last middleware to close unregisters the attributes and removes the
        background-task wrapper.
        """
        if self._patched:
            self._patched = False
            _unpatch_background()
        if self._open:
            self._open = False
            _unregister()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: shed it, or run the app with the request's attributes."""
        kind = scope.get("type")
        if kind == "http" or kind == "websocket":
            if self._shedder is not None and self._shed(scope, kind):
                await self._refuse(kind, send)
                return
            token = _REQUEST.set(scope)
            try:
                await self.app(scope, receive, send)
            finally:
                _REQUEST.reset(token)
        elif kind == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _shed(self, scope: Scope, kind: str) -> bool:
        """Whether to refuse this request now; never raises (fails open)."""
        try:
            if kind == "websocket" and not self.shed_websockets:
                return False
            path = scope.get("path", "")
            if path in self._exempt or (self._exempt_under and path.startswith(self._exempt_under)):
                return False
            assert self._shedder is not None
            reason = self._shedder.overloaded()
            if reason is None:
                return False
            metrics.record(metrics.ASGI_SHED, 1, {metrics.ASGI_SHED_REASON: reason})
            return True
        except Exception:
            logger.exception("loopguard: load shedding check failed; the request goes through")
            return False

    async def _refuse(self, kind: str, send: Send) -> None:
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1013, "reason": "overloaded"})
            return
        await send({"type": "http.response.start", "status": 503, "headers": self._headers})
        await send({"type": "http.response.body", "body": b"service overloaded\n"})

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            await send(message)
            if message.get("type") == "lifespan.shutdown.complete":
                self.close()

        return lifespan_send
