"""The blocking-call guard: a catalogue of calls that block, and the guard that reports them.

The guard replaces each catalogued function (``time.sleep``, blocking socket and file
calls, lock and queue waits, ``subprocess``, ``sqlite3``, ``http.client``, sync HTTP and
database clients, ...) with a small Python function. Off a loop thread that function
only asks ``asyncio._get_running_loop()`` (a C call) and whether any trio run is in
progress, then calls the original: a few dozen nanoseconds. On a thread that runs an
event loop it asks whether *this* call would block (a non-blocking socket, an
uncontended lock, ``sleep(0)``, a finished future do not), checks the allow rules
against the caller's stack, and then warns, records or refuses the call
(:class:`BlockingCallError`).

Patching happens only while at least one :class:`BlockingGuard` runs (``install(
blocking=...)`` starts one); modules that are not imported yet are patched when they
are, through removable post-import hooks. Stopping the last guard puts every original
back. Objects created while a guard ran (locks from ``threading.Lock()``, sqlite3 and
psycopg2 connections) stay usable afterwards and turn into plain pass-throughs.

C types cannot be patched without ``forbiddenfruit``, so methods of C objects are
reached through what creates them: ``threading.Lock``/``RLock`` and ``select.poll``
return guarded objects, ``sqlite3.connect``/``psycopg2.connect`` pass a guarded
connection factory. Objects created before the guard started are not guarded.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import functools
import linecache
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import CodeType, FrameType, ModuleType
from typing import Any, ClassVar, Literal, NamedTuple

from .. import metrics
from .._core.frames import callback_frames, capture, culprit_of, is_own, own_part
from .._core.patch import ReplacePatch, cancel_import_hook, when_imported
from ..events import BlockingCall, Frame
from ..sinks import LoggingSink, Sink, SinkSet

__all__ = [
    "Allow",
    "BlockingCallError",
    "BlockingGuard",
    "CatalogueEntry",
    "RuleHits",
    "catalogue",
    "format_rules",
]

logger = logging.getLogger("loopguard")

Mode = Literal["off", "warn", "raise", "record"]
_MODES = ("off", "warn", "raise", "record")
_STRENGTH = {"record": 1, "warn": 2, "raise": 3}

_grl = asyncio._get_running_loop
_get_ident = _thread.get_ident
_perf_counter = time.perf_counter

# Threads inside trio.run / a trio guest run, with a nesting count. Mutated under
# _trio_lock; read without it on the fast path (an empty dict is all it asks).
_trio_threads: dict[int, int] = {}
_trio_lock = _thread.allocate_lock()


class BlockingCallError(RuntimeError):
    """A blocking call was made on an event loop thread while the guard's mode is ``raise``.

    Raised *before* the call runs, from the line that made it.

    Attributes:
        event: The :class:`~loopguard.BlockingCall` that was reported.
        function: Catalogue name of the refused call (e.g. ``"time.sleep"``).
    """

    def __init__(self, event: BlockingCall) -> None:
        where = f" at {event.culprit}" if event.culprit else ""
        task = f" in task {event.task!r}" if event.task else ""
        super().__init__(
            f"blocking call {event.function}() on the {event.loop} event loop thread "
            f"{event.thread!r}{task}{where}; run it in a worker thread "
            f"(asyncio.to_thread, anyio.to_thread.run_sync) or allow it with an Allow rule"
        )
        self.event = event
        self.function = event.function

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.event,))


BlockingCallError.__module__ = "loopguard"  # how tracebacks name it


# -- allow rules ---------------------------------------------------------------------


@dataclass(frozen=True)
class Allow:
    """A place where blocking calls are allowed (never reported).

    A rule matches a call when a frame on the caller's stack belongs to ``module``
    (or a submodule) and, if given, runs ``function``. By default any frame down the
    stack counts: ``Allow("logging")`` allows whatever a logging handler does. With
    ``direct=True`` only the frame that made the call counts.

    Args:
        module: Dotted module name; submodules match too.
        function: Function name, or qualified name such as ``"Thread.start"``
            (``None``: any function of the module).
        calls: Catalogue names the rule applies to, or prefixes (``"socket"``) or
            last parts (``"open"``) of them; empty: every call.
        direct: Match only the frame that made the call, not its callers.
        reason: Why the rule exists, shown in the rule report.
    """

    module: str
    function: str | None = None
    calls: tuple[str, ...] = ()
    direct: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module.strip(". "):
            raise ValueError(f"Allow: module must be a dotted module name, got {self.module!r}")
        calls: Any = self.calls  # a lone string is one call, not its characters
        object.__setattr__(self, "calls", (calls,) if isinstance(calls, str) else tuple(calls))

    @classmethod
    def parse(cls, rule: str | Allow) -> Allow:
        """Build a rule from its text form ``module[:function][@call,call...]``.

        Examples: ``"logging"``, ``"myapp.cache:warm_up"``,
        ``"myapp.db:Repo.load@sqlite3,open"``.

        Raises:
            ValueError: The text is not a valid rule.
        """
        if isinstance(rule, Allow):
            return rule
        if not isinstance(rule, str):
            raise ValueError(f"an allow rule is a string or Allow, got {rule!r}")
        text, _, calls = rule.strip().partition("@")
        module, _, function = text.partition(":")
        return cls(
            module.strip(),
            function.strip() or None,
            tuple(c.strip() for c in calls.split(",") if c.strip()),
        )

    def __str__(self) -> str:
        text = self.module + (f":{self.function}" if self.function else "")
        if self.calls:
            text += "@" + ",".join(self.calls)
        return text + (" (direct caller)" if self.direct else "")

    def applies_to(self, call: str) -> bool:
        """True when the rule covers the catalogue name ``call``.

        A name in :attr:`calls` covers itself, the names it is a prefix of
        (``"socket"``: every ``socket.*`` call) and the names it ends (``"open"``:
        ``builtins.open`` and ``io.open``).
        """
        return not self.calls or any(
            call == c or call.startswith(c + ".") or call.endswith("." + c) for c in self.calls
        )

    def matches(self, module: str, qualname: str) -> bool:
        """True when a frame of ``module`` running ``qualname`` is covered."""
        if module != self.module and not module.startswith(self.module + "."):
            return False
        function = self.function
        if function is None or function == qualname or qualname.startswith(function + "."):
            return True
        # A bare rule matches that function in any class; on Python 3.10 frames only
        # know the bare name, so "Class.method" matches any method of that name.
        if "." in qualname and "." in function:
            return False
        return function.rsplit(".", 1)[-1] == qualname.rsplit(".", 1)[-1]


DEFAULT_ALLOW: tuple[Allow, ...] = (
    Allow("importlib._bootstrap", "_find_and_load", reason="module code run while importing"),
    Allow("logging", reason="logging handlers: their locks and writes"),
    Allow("linecache", reason="source lines read for tracebacks"),
    Allow("coverage", reason="coverage.py's tracer"),
    Allow("_pydevd_bundle", reason="the debugger"),
    Allow("pydevd", reason="the debugger"),
    Allow("threading", "Thread.start", direct=True, reason="waiting for a new thread to start"),
    Allow(
        "selectors",
        calls=("select.select", "select.poll"),
        direct=True,
        reason="the event loop's own selector",
    ),
    Allow(
        "subprocess",
        "Popen._execute_child",
        direct=True,
        reason="a new child process reporting exec",
    ),
    Allow("asyncio.unix_events", direct=True, reason="asyncio's child watchers and unix servers"),
    Allow(
        "asyncio.base_events",
        "BaseEventLoop.shutdown_default_executor",
        direct=True,
        reason="asyncio joining its executor's shutdown thread",
    ),
    Allow(
        "concurrent.futures.thread",
        "ThreadPoolExecutor.submit",
        direct=True,
        reason="handing work to a thread pool",
    ),
    Allow(
        "concurrent.futures._base",
        calls=(
            "threading.Condition.__enter__",
            "threading.RLock.acquire",
            "threading.Lock.acquire",
        ),
        direct=True,
        reason="a future's own condition, never held across a wait: refusing it leaves the "
        "future unset and its waiter hung",
    ),
    Allow(
        "fastapi.routing",
        "_extract_endpoint_context",
        calls=("os.stat", "os.lstat", "open"),
        reason="FastAPI looks up an endpoint's source file once per endpoint, for error text",
    ),
)


class RuleHits(NamedTuple):
    """How often an allow rule let a blocking call through.

    Attributes:
        rule: The rule.
        hits: Calls it allowed since the guard started.
        default: Whether it is one of loopguard's default rules.
    """

    rule: Allow
    hits: int
    default: bool


def format_rules(rules: Iterable[RuleHits], *, defaults: bool = False) -> str:
    """Render a rule report: which rules fired (and how often) and which never did.

    Args:
        rules: From :meth:`BlockingGuard.rules`.
        defaults: Also list loopguard's default rules.

    Returns:
        A multi-line string without a trailing newline.
    """
    rows = [r for r in rules if defaults or not r.default]
    if not rows:
        return "loopguard allow rules: none configured"
    lines = ["loopguard allow rules:"]
    for r in rows:
        status = f"{r.hits} call(s) allowed" if r.hits else "never fired"
        reason = f" - {r.rule.reason}" if r.rule.reason else ""
        tag = " [default]" if r.default else ""
        lines.append(f"  {status:>20}  {r.rule}{tag}{reason}")
    return "\n".join(lines)


# -- the per-call machinery -----------------------------------------------------------


class _Run:
    __slots__ = ()


_RUN: Any = _Run()  # the call does not block: run it unguarded
_BLOCKS: Any = object()  # the call would block
_ALLOWED: Any = object()  # it blocks, but is allowed (or no guard wants it)


Probe = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


_AUTO = -2  # _Entry.shape: read the signature


class _Entry:
    """One catalogue name: what the guarded call is called and how to tell it blocks."""

    __slots__ = ("name", "probe", "shape")

    def __init__(self, name: str, probe: Probe | None, shape: int | None = _AUTO) -> None:
        self.name = name
        self.probe = probe
        self.shape = shape  # see _shape(); known here for C functions without a signature


class _State(threading.local):
    busy = False


_state = _State()
_guards: tuple[BlockingGuard, ...] = ()
# Blocking calls that ran and were reported (warn mode), newest last: (thread ident, end on the
# monotonic clock, seconds, catalogue name). The watchdog matches a stall to the call
# that caused it, so that one incident is reported once.
_recent: collections.deque[tuple[int, float, float, str]] = collections.deque(maxlen=32)
_monotonic = time.monotonic
_failed_once = False


def _on_loop(
    entry: _Entry, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The slow path: the calling thread may be running an event loop."""
    __tracebackhide__ = True  # pytest: the failure is the caller's line, not ours
    probe = entry.probe
    if probe is not None:  # first: most calls asyncio makes itself end here
        try:
            seen = probe(original, args, kwargs)
        except Exception:
            seen = _RUN
        if seen is _RUN:
            return original(*args, **kwargs)
        if seen is not _BLOCKS:
            return seen  # done without blocking (an uncontended lock, a queued item)
    state = _state
    if state.busy or not _guards:
        return original(*args, **kwargs)
    state.busy = True  # whatever runs from here (probes, sinks, the call) is not checked
    try:
        try:
            verdict = _verdict(entry, original, args, kwargs)
        except BlockingCallError:
            raise
        except Exception:
            _internal_error()
            verdict = _RUN
        if verdict is _RUN:
            state.busy = False
            return original(*args, **kwargs)
        if verdict is _ALLOWED:
            return original(*args, **kwargs)
        start = _perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = _perf_counter() - start
            if any(action == "warn" for _, action, _ in verdict.plan):
                _recent.append((_get_ident(), _monotonic(), took, entry.name))
            verdict.deliver(took)
    finally:
        state.busy = False


def _internal_error() -> None:
    global _failed_once
    if not _failed_once:
        _failed_once = True
        logger.exception("loopguard blocking-call guard failed; the call was let through")


def _loop_kind() -> tuple[Any, str] | None:
    loop = _grl()
    if loop is not None:
        return loop, ("uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio")
    if _get_ident() in _trio_threads:
        # Between its steps (a guest run's host waiting, code around trio.run) the
        # thread is not running the loop: only code inside a trio task counts.
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_task():
            return None, "trio"
    return None


def _verdict(
    entry: _Entry, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    __tracebackhide__ = True
    found = _loop_kind()
    if found is None:
        return _RUN
    frame: FrameType | None = sys._getframe(2)
    # Past the guard's own frames (generated replacements included) to the caller.
    while frame is not None and own_part(frame.f_code.co_filename) == "_blocking":
        frame = frame.f_back
    if frame is None:
        return _RUN
    if is_own(frame.f_code.co_filename):
        return _ALLOWED  # loopguard's own waits (stopping a sampler, writing a sink)
    stack_info = _StackInfo(frame)
    plan: list[tuple[BlockingGuard, str, int | None]] = []
    key = (entry.name, frame.f_code, frame.f_lineno)
    strongest = ""
    for guard in _guards:
        action = guard._mode
        if action == "off" or guard._allows(entry.name, stack_info):
            continue
        if guard._scope and not guard._in_scope(stack_info):
            action = "record"  # outside the code under check: known, not refused
        if _STRENGTH[action] > _STRENGTH.get(strongest, 0):
            strongest = action
        admitted = guard._admit(key)
        if admitted is None and not guard._listeners and action != "raise":
            continue  # rate-limited and nobody needs the details
        plan.append((guard, action, admitted))
    if strongest:
        metrics.record(
            metrics.ASYNCIO_BLOCKING_CALLS, 1, {"function": entry.name, "action": strongest}
        )
    if not plan:
        return _ALLOWED
    loop, kind = found
    stack = capture(frame)
    report = _Report(
        entry.name,
        stack,
        culprit_of(callback_frames(stack)) or (stack[-1] if stack else None),
        _task_name(loop, kind),
        threading.current_thread().name,
        kind,
        plan,
    )
    if any(action == "raise" for _, action, _ in plan):
        event = report.deliver(0.0)
        raise BlockingCallError(event)
    return report


class _StackInfo:
    """The caller's frames as (module, qualname), read lazily and at most once."""

    __slots__ = ("_frame", "_rows")

    def __init__(self, frame: FrameType) -> None:
        self._frame = frame
        self._rows: list[tuple[str, str]] | None = None

    @property
    def first(self) -> tuple[str, str]:
        return _describe(self._frame)

    def rows(self) -> list[tuple[str, str]]:
        if self._rows is None:
            rows: list[tuple[str, str]] = []
            frame: FrameType | None = self._frame
            while frame is not None and len(rows) < 500:
                rows.append(_describe(frame))
                frame = frame.f_back
            self._rows = rows
        return self._rows


def _describe(frame: FrameType) -> tuple[str, str]:
    code = frame.f_code
    return (frame.f_globals.get("__name__") or "", getattr(code, "co_qualname", code.co_name))


def _task_name(loop: Any, kind: str) -> str | None:
    try:
        if kind == "trio":
            import trio

            return str(trio.lowlevel.current_task().name)
        task = asyncio.current_task(loop)
        return task.get_name() if task is not None else None
    except Exception:
        return None


class _Report:
    """A blocking call some guards want to hear about, delivered once it has run."""

    __slots__ = ("culprit", "function", "loop", "plan", "stack", "task", "thread")

    def __init__(
        self,
        function: str,
        stack: tuple[Frame, ...],
        culprit: Frame | None,
        task: str | None,
        thread: str,
        loop: str,
        plan: list[tuple[BlockingGuard, str, int | None]],
    ) -> None:
        self.function = function
        self.stack = stack
        self.culprit = culprit
        self.task = task
        self.thread = thread
        self.loop = loop
        self.plan = plan

    def deliver(self, duration: float) -> BlockingCall:
        """Hand one event per guard over; return the event of the first guard that raises."""
        first: BlockingCall | None = None
        for guard, action, admitted in self.plan:
            event = BlockingCall(
                function=self.function,
                duration=round(duration, 6),
                task=self.task,
                stack=self.stack,
                action=action,
                culprit=self.culprit,
                thread=self.thread,
                loop=self.loop,
                suppressed=admitted or 0,
            )
            if first is None or (action == "raise" and first.action != "raise"):
                first = event
            guard._deliver(event, to_sinks=admitted is not None)
        assert first is not None
        return first


# -- replacements -----------------------------------------------------------------------


def _shape(original: Callable[..., Any]) -> int | None:
    """How many arguments ``original`` takes if always exactly that many, all positional-only.

    Returns:
        That number (0 to 2), ``-1`` when it takes positional-only arguments only but
        not a fixed number, ``None`` otherwise (or when its signature is unknown).
    """
    import inspect

    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in params}
    if not kinds <= {inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL}:
        return None
    if inspect.Parameter.VAR_POSITIONAL in kinds or any(
        p.default is not inspect.Parameter.empty for p in params
    ):
        return -1
    return len(params) if len(params) <= 2 else -1


_MISSING_ARG: Any = object()


def _mirror(entry: _Entry, original: Callable[..., Any]) -> Callable[..., Any] | None:
    """A replacement with the very signature of ``original``, when it has a readable one.

    Arguments left out keep a private default, so the common call (required arguments
    only) is passed on as is: nothing is packed into ``*args`` or ``**kwargs``.
    Functions with ``*args``/``**kwargs`` or without a signature get ``None``.
    """
    import inspect

    kind = inspect.Parameter
    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD) for p in params):
        return None
    if any(not p.name.isidentifier() or p.name.startswith("_") for p in params):
        return None
    names = [f"a{i}" if p.kind is kind.POSITIONAL_ONLY else p.name for i, p in enumerate(params)]
    header: list[str] = []
    for i, (p, name) in enumerate(zip(params, names, strict=True)):
        previous = params[i - 1].kind if i else None
        if previous is kind.POSITIONAL_ONLY and p.kind is not kind.POSITIONAL_ONLY:
            header.append("/")
        if p.kind is kind.KEYWORD_ONLY and previous is not kind.KEYWORD_ONLY:
            header.append("*")
        header.append(name if p.default is p.empty else f"{name}=_M")
    if params and params[-1].kind is kind.POSITIONAL_ONLY:
        header.append("/")
    positional = [
        n
        for p, n in zip(params, names, strict=True)
        if p.default is p.empty and p.kind is not kind.KEYWORD_ONLY
    ]
    keyword = [
        n
        for p, n in zip(params, names, strict=True)
        if p.default is p.empty and p.kind is kind.KEYWORD_ONLY
    ]
    optional = [(p, n) for p, n in zip(params, names, strict=True) if p.default is not p.empty]
    build = [
        f"_a = [{', '.join(positional)}]",
        "_k = {" + ", ".join(f"{n!r}: {n}" for n in keyword) + "}",
    ]
    for p, n in optional:
        if p.kind is kind.POSITIONAL_ONLY:
            build.append(f"if {n} is not _M: _a.append({n})")
        else:
            build.append(f"if {n} is not _M: _k[{n!r}] = {n}")
    plain = ", ".join([*positional, *(f"{n}={n}" for n in keyword)])
    skip = ""
    if entry.probe is _p_socket and positional:
        skip = f" or {positional[0]}.gettimeout() == 0.0"
    body = [f"    def guarded({', '.join(header)}):"]
    body.append(f"        if (_grl() is None and not _trio_threads){skip}:")
    if optional:
        body.append(f"            if {' and '.join(f'{n} is _M' for _, n in optional)}:")
        body.append(f"                return _o({plain})")
        body.extend(f"            {line}" for line in build)
        body.append("            return _o(*_a, **_k)")
    else:
        body.append(f"            return _o({plain})")
    body.append("        __tracebackhide__ = True")
    body.extend(f"        {line}" for line in build)
    body.append("        return _on_loop(_e, _o, tuple(_a), _k)")
    body.append("    return guarded")
    source = "def _make(_o, _e, _M):\n" + "\n".join(body)
    scope: dict[str, Any] = {}
    # A file name inside this subpackage: frames.own_part() counts these frames as the
    # guard's, and linecache shows the generated source in tracebacks.
    filename = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"<guard of {entry.name}>")
    try:
        code = compile(source, filename, "exec")
        exec(code, globals(), scope)  # the source is built above from a signature
    except SyntaxError:
        return None
    lines = [line + "\n" for line in source.splitlines()]
    linecache.cache[filename] = (len(source), None, lines, filename)
    guarded: Callable[..., Any] = scope["_make"](original, entry, _MISSING_ARG)
    functools.update_wrapper(guarded, original, updated=())
    return guarded


def _guarded(entry: _Entry, original: Callable[..., Any]) -> Callable[..., Any]:
    """Return the replacement of ``original``: a plain function with a C-only fast path.

    Off the loop the replacement costs a Python call and ``_get_running_loop()``;
    packing ``*args``/``**kwargs`` is a large part of that, so functions that take a
    fixed number of positional-only arguments (most of the C ones) get a replacement
    of exactly that signature, and positional-only ones no ``**kwargs``.
    """
    on_loop = _on_loop
    grl = _grl
    mirrored = _mirror(entry, original)
    if mirrored is not None:
        return mirrored
    shape = _shape(original) if entry.shape == _AUTO else entry.shape
    guarded: Callable[..., Any]

    if entry.probe is _p_socket and shape == -1:
        # Socket methods: asyncio calls them on the loop all the time, on non-blocking
        # sockets; let those through without leaving this frame.
        def guarded(*args: Any) -> Any:
            if (grl() is None and not _trio_threads) or args[0].gettimeout() == 0.0:
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, {})

    elif entry.probe is _p_socket:

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if (grl() is None and not _trio_threads) or args[0].gettimeout() == 0.0:
                if kwargs:
                    return original(*args, **kwargs)
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, kwargs)

    elif shape == 0:

        def guarded() -> Any:
            if grl() is None and not _trio_threads:
                return original()
            __tracebackhide__ = True
            return on_loop(entry, original, (), {})

    elif shape == 1:

        def guarded(a: Any, /) -> Any:
            if grl() is None and not _trio_threads:
                return original(a)
            __tracebackhide__ = True
            return on_loop(entry, original, (a,), {})

    elif shape == 2:

        def guarded(a: Any, b: Any, /) -> Any:
            if grl() is None and not _trio_threads:
                return original(a, b)
            __tracebackhide__ = True
            return on_loop(entry, original, (a, b), {})

    elif shape == -1:

        def guarded(*args: Any) -> Any:
            if grl() is None and not _trio_threads:
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, {})

    else:

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if grl() is None and not _trio_threads:
                if kwargs:
                    return original(*args, **kwargs)
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, kwargs)

    functools.update_wrapper(guarded, original, updated=())
    return guarded


def _replace(entry: _Entry) -> Callable[[Any], Any]:
    return lambda original: _guarded(entry, original)


# -- probes: does this call block? ------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _p_socket(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if args[0].gettimeout() == 0.0 else _BLOCKS


def _p_sleep(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    secs = _arg(args, kwargs, 0, "secs", None)
    return _RUN if isinstance(secs, (int, float)) and secs <= 0 else _BLOCKS


def _p_fd(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    get_blocking = getattr(os, "get_blocking", None)
    if get_blocking is None:
        return _BLOCKS
    return _BLOCKS if get_blocking(args[0]) else _RUN


def _p_sendfile(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _p_fd(original, (_arg(args, kwargs, 0, "out_fd", None),), {})


def _p_waitpid(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    options = _arg(args, kwargs, 1, "options", 0)
    return _RUN if options & getattr(os, "WNOHANG", 0) else _BLOCKS


def _p_open(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if isinstance(_arg(args, kwargs, 0, "file", None), int) else _BLOCKS


def _p_select(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    timeout = args[3] if len(args) > 3 else None
    return _RUN if timeout is not None and timeout <= 0 else _BLOCKS


def _p_poll(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    timeout = _arg(args, kwargs, 0, "timeout", None)
    return _RUN if timeout is not None and timeout == 0 else _BLOCKS


# A lock another thread holds for a short critical section (a future's condition, an
# Event's, a queue's mutex) is free again within microseconds: waiting that long is not
# blocking. Refusing it instead would break the other thread's protocol (a future the
# loop never completes leaves its waiter hung for ever), so a lock counts as blocking
# only once it stayed taken for this long.
_LOCK_GRACE = 0.005


def _within_grace(acquire: Callable[..., Any], *args: Any) -> bool:
    """Try a lock for the grace period, unguarded (a semaphore waits on a condition)."""
    state = _state
    if state.busy:
        return bool(acquire(*args, True, _LOCK_GRACE))
    state.busy = True
    try:
        return bool(acquire(*args, True, _LOCK_GRACE))
    finally:
        state.busy = False


def _p_lock(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # original is the bound acquire of the real lock
    if not _arg(args, kwargs, 0, "blocking", True) or _arg(args, kwargs, 1, "timeout", -1) == 0:
        return _RUN
    return True if original(False) or _within_grace(original) else _BLOCKS


def _p_semaphore(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _arg(args, kwargs, 1, "blocking", True) or _arg(args, kwargs, 2, "timeout", None) == 0:
        return _RUN
    return True if original(args[0], False) or _within_grace(original, args[0]) else _BLOCKS


def _p_condition_enter(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    lock = args[0]._lock
    return True if lock.acquire(False) or _within_grace(lock.acquire) else _BLOCKS


def _p_timeout(index: int) -> Probe:
    def probe(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        timeout = _arg(args, kwargs, index, "timeout", None)
        return _RUN if timeout is not None and timeout <= 0 else _BLOCKS

    return probe


def _p_event_wait(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args[0].is_set():
        return _RUN
    return _p_timeout(1)(original, args, kwargs)


def _p_barrier_wait(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    barrier = args[0]
    count, parties = getattr(barrier, "_count", None), getattr(barrier, "_parties", None)
    if count is not None and parties is not None and count + 1 >= parties:
        return _RUN  # the last party to arrive does not wait
    return _BLOCKS


def _p_join(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args[0].is_alive():
        return _RUN
    return _p_timeout(1)(original, args, kwargs)


def _p_queue_get(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import queue

    if not _arg(args, kwargs, 1, "block", True):
        return _RUN
    try:
        return original(args[0], False)
    except queue.Empty:
        return _BLOCKS


def _p_queue_put(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import queue

    if not _arg(args, kwargs, 2, "block", True) or args[0].maxsize <= 0:
        return _RUN
    try:
        return original(args[0], args[1] if len(args) > 1 else kwargs["item"], False)
    except queue.Full:
        return _BLOCKS


def _p_future(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if args[0].done() else _BLOCKS


def _p_popen_wait(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if args[0].poll() is not None else _BLOCKS


# -- guarded objects for C types ---------------------------------------------------------

_LOCK = _Entry("threading.Lock.acquire", _p_lock)
_RLOCK = _Entry("threading.RLock.acquire", _p_lock)
_POLL = _Entry("select.poll.poll", _p_poll)
_allocate_lock = _thread.allocate_lock
_RealLock = _thread.LockType
_rlock_acquire = _thread.RLock.acquire


class _LockMeta(type):
    # threading.Lock is the lock type itself on Python 3.13+: keep isinstance() working.
    def __instancecheck__(cls, obj: object) -> bool:
        return type(obj) is _RealLock or type.__instancecheck__(cls, obj)


class GuardedLock(metaclass=_LockMeta):
    """What ``threading.Lock()`` returns while a guard runs: a lock whose waits are checked."""

    __slots__ = ("__weakref__", "_acquire", "_lock", "locked", "release")

    def __init__(self) -> None:
        lock = _allocate_lock()
        self._lock = lock
        self._acquire = lock.acquire
        self.release = lock.release
        self.locked = lock.locked

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock, like ``threading.Lock.acquire``."""
        if _grl() is None and not _trio_threads:
            return self._acquire(blocking, timeout)
        __tracebackhide__ = True
        return bool(_on_loop(_LOCK, self._acquire, (blocking, timeout), {}))

    def __enter__(self) -> bool:
        if _grl() is None and not _trio_threads:
            return self._acquire()
        __tracebackhide__ = True
        return bool(_on_loop(_LOCK, self._acquire, (), {}))

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.release()

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return "<guarded " + repr(self._lock)[1:]


class GuardedRLock(_thread.RLock):  # type: ignore[misc]
    """What ``threading.RLock()`` returns while a guard runs."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock, like ``threading.RLock.acquire``."""
        if _grl() is None and not _trio_threads:
            return _rlock_acquire(self, blocking, timeout)
        __tracebackhide__ = True
        return bool(_on_loop(_RLOCK, _rlock_acquire.__get__(self), (blocking, timeout), {}))

    def __enter__(self, blocking: bool = True, timeout: float = -1) -> bool:
        if _grl() is None and not _trio_threads:
            return _rlock_acquire(self, blocking, timeout)
        __tracebackhide__ = True
        return bool(_on_loop(_RLOCK, _rlock_acquire.__get__(self), (blocking, timeout), {}))


def _make_rlock(original: Any) -> Any:
    def RLock(*args: Any, **kwargs: Any) -> Any:
        return GuardedRLock(*args, **kwargs)

    functools.update_wrapper(RLock, original, updated=())
    return RLock


class _GuardedPoll:
    __slots__ = ("_poll", "modify", "register", "unregister")

    def __init__(self, poll: Any) -> None:
        self._poll = poll
        self.register = poll.register
        self.modify = poll.modify
        self.unregister = poll.unregister

    def poll(self, *args: Any) -> Any:
        if _grl() is None and not _trio_threads:
            return self._poll.poll(*args)
        __tracebackhide__ = True
        return _on_loop(_POLL, self._poll.poll, args, {})


def _make_poll(original: Any) -> Any:
    def poll() -> Any:
        return _GuardedPoll(original())

    functools.update_wrapper(poll, original, updated=())
    return poll


def _subclass_with(
    base: type, entries: dict[str, tuple[_Entry, Callable[..., Any]]], extra: dict[str, Any]
) -> type:
    """A subclass of a C type whose listed methods are guarded."""
    namespace: dict[str, Any] = {"__module__": __name__, "_loopguard_guarded": True}
    for attr, (entry, original) in entries.items():
        namespace[attr] = _guarded(entry, original)
    namespace.update(extra)
    return type(f"Guarded{base.__name__.capitalize()}", (base,), namespace)


_subclass_cache: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _cached_subclass(base: type, build: Callable[[type], type]) -> type:
    if getattr(base, "_loopguard_guarded", False):
        return base
    cls = _subclass_cache.get(base)
    if cls is None:
        cls = _subclass_cache[base] = build(base)
    return cls


# sqlite3: connections and cursors are C types; sqlite3.connect passes a guarded factory.

_SQLITE_CONNECT = _Entry("sqlite3.connect", None)
_SQLITE_CONN_METHODS = ("execute", "executemany", "executescript", "commit", "rollback")
_SQLITE_CURSOR_METHODS = (
    "execute",
    "executemany",
    "executescript",
    "fetchone",
    "fetchmany",
    "fetchall",
)
_SQLITE_ENTRIES = {
    **{f"conn.{m}": _Entry(f"sqlite3.Connection.{m}", None) for m in _SQLITE_CONN_METHODS},
    **{f"cur.{m}": _Entry(f"sqlite3.Cursor.{m}", None) for m in _SQLITE_CURSOR_METHODS},
}


def _sqlite_cursor_class(base: type) -> type:
    return _cached_subclass(
        base,
        lambda b: _subclass_with(
            b, {m: (_SQLITE_ENTRIES[f"cur.{m}"], getattr(b, m)) for m in _SQLITE_CURSOR_METHODS}, {}
        ),
    )


def _sqlite_connection_class(base: type) -> type:
    import sqlite3

    plain_cursor = base.cursor  # type: ignore[attr-defined]

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        factory = args[0] if args else kwargs.pop("factory", None)
        factory = sqlite3.Cursor if factory is None else factory
        if isinstance(factory, type) and issubclass(factory, sqlite3.Cursor):
            factory = _sqlite_cursor_class(factory)
        return plain_cursor(self, factory, **kwargs)

    def via_cursor(method: str) -> Callable[..., Any]:
        def call(self: Any, *args: Any) -> Any:
            return getattr(self.cursor(), method)(*args)

        call.__name__ = call.__qualname__ = method
        return call

    def build(b: type) -> type:
        methods: dict[str, tuple[_Entry, Callable[..., Any]]] = {}
        for m in _SQLITE_CONN_METHODS:
            original = via_cursor(m) if m.startswith("execute") else getattr(b, m)
            methods[m] = (_SQLITE_ENTRIES[f"conn.{m}"], original)
        return _subclass_with(b, methods, {"cursor": cursor})

    return _cached_subclass(base, build)


def _make_sqlite_connect(original: Any) -> Any:
    import sqlite3

    def connect(*args: Any, **kwargs: Any) -> Any:
        try:
            if len(args) > 5:
                args = (*args[:5], _sqlite_connection_class(args[5]), *args[6:])
            else:
                kwargs["factory"] = _sqlite_connection_class(
                    kwargs.get("factory") or sqlite3.Connection
                )
        except Exception:
            _internal_error()
        if _grl() is None and not _trio_threads:
            return original(*args, **kwargs)
        __tracebackhide__ = True
        return _on_loop(_SQLITE_CONNECT, original, args, kwargs)

    functools.update_wrapper(connect, original, updated=())
    return connect


# psycopg2: the same arrangement through connection_factory / cursor_factory.

_PG_CONNECT = _Entry("psycopg2.connect", None)
_PG_CONN_METHODS = ("commit", "rollback")
_PG_CURSOR_METHODS = (
    "execute",
    "executemany",
    "callproc",
    "fetchone",
    "fetchmany",
    "fetchall",
    "copy_from",
    "copy_to",
    "copy_expert",
)
_PG_ENTRIES = {
    **{f"conn.{m}": _Entry(f"psycopg2.connection.{m}", None) for m in _PG_CONN_METHODS},
    **{f"cur.{m}": _Entry(f"psycopg2.cursor.{m}", None) for m in _PG_CURSOR_METHODS},
}


def _pg_cursor_class(base: type) -> type:
    return _cached_subclass(
        base,
        lambda b: _subclass_with(
            b,
            {
                m: (_PG_ENTRIES[f"cur.{m}"], getattr(b, m))
                for m in _PG_CURSOR_METHODS
                if hasattr(b, m)
            },
            {},
        ),
    )


def _pg_connection_class(base: type, default_cursor: type) -> type:
    plain_cursor = base.cursor  # type: ignore[attr-defined]

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1:
            args = (args[0], _pg_cursor_class(args[1] or default_cursor), *args[2:])
        else:
            factory = kwargs.get("cursor_factory") or self.cursor_factory or default_cursor
            kwargs["cursor_factory"] = _pg_cursor_class(factory)
        return plain_cursor(self, *args, **kwargs)

    def build(b: type) -> type:
        return _subclass_with(
            b,
            {m: (_PG_ENTRIES[f"conn.{m}"], getattr(b, m)) for m in _PG_CONN_METHODS},
            {"cursor": cursor},
        )

    return _cached_subclass(base, build)


def _make_pg_connect(original: Any) -> Any:
    def connect(*args: Any, **kwargs: Any) -> Any:
        try:
            import psycopg2.extensions

            kwargs["connection_factory"] = _pg_connection_class(
                kwargs.get("connection_factory") or psycopg2.extensions.connection,
                psycopg2.extensions.cursor,
            )
        except Exception:
            _internal_error()
        if _grl() is None and not _trio_threads:
            return original(*args, **kwargs)
        __tracebackhide__ = True
        return _on_loop(_PG_CONNECT, original, args, kwargs)

    functools.update_wrapper(connect, original, updated=())
    return connect


# trio: remember which threads are inside a run (the fast path reads _trio_threads).


def _trio_enter(ident: int) -> None:
    with _trio_lock:
        _trio_threads[ident] = _trio_threads.get(ident, 0) + 1


def _trio_leave(ident: int) -> None:
    with _trio_lock:
        left = _trio_threads.get(ident, 0) - 1
        if left > 0:
            _trio_threads[ident] = left
        else:
            _trio_threads.pop(ident, None)


def _make_trio_run(original: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        ident = _get_ident()
        _trio_enter(ident)
        try:
            return original(*args, **kwargs)
        finally:
            _trio_leave(ident)

    functools.update_wrapper(run, original, updated=())
    return run


def _make_trio_guest(original: Any) -> Any:
    def start_guest_run(*args: Any, **kwargs: Any) -> Any:
        done = kwargs.get("done_callback")
        if done is None:
            return original(*args, **kwargs)
        ident = _get_ident()
        left = [False]

        def leave() -> None:
            if not left[0]:
                left[0] = True
                _trio_leave(ident)

        def done_callback(outcome: Any) -> Any:
            leave()
            return done(outcome)

        kwargs["done_callback"] = done_callback
        _trio_enter(ident)
        try:
            return original(*args, **kwargs)
        except BaseException:
            leave()
            raise

    functools.update_wrapper(start_guest_run, original, updated=())
    return start_guest_run


# -- the catalogue ----------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueEntry:
    """One call the guard knows blocks.

    Attributes:
        name: The name reported in :attr:`BlockingCall.function`.
        module: The module that must be imported for the entry to apply.
        target: The attribute that is patched, relative to ``module``.
        when: When the call counts as blocking (empty: always, on a loop thread).
        group: Catalogue section (``"time"``, ``"socket"``, ``"threading"``, ...).
    """

    name: str
    module: str
    target: str
    when: str
    group: str


class _Target(NamedTuple):
    entry: CatalogueEntry
    make: Callable[[Any], Any] | None  # None: reached through another target's objects


_TARGETS: list[_Target] = []


def _add(
    group: str,
    module: str,
    target: str,
    probe: Probe | None = None,
    when: str = "",
    *,
    name: str | None = None,
    make: Callable[[_Entry], Callable[[Any], Any]] | Callable[[Any], Any] | None = None,
    via: bool = False,
    shape: int | None = _AUTO,
) -> None:
    full = name or f"{module}.{target}"
    entry = CatalogueEntry(full, module, target, when, group)
    if via:
        _TARGETS.append(_Target(entry, None))
        return
    maker = make if make is not None else _replace(_Entry(full, probe, shape))
    _TARGETS.append(_Target(entry, maker))


_NONBLOCKING = "the socket is in blocking mode (a timeout counts as blocking)"
# C socket methods that take positional arguments only (no signature to read).
_SOCKET_SHAPES = dict.fromkeys(
    (
        "connect",
        "connect_ex",
        "recv",
        "recvfrom",
        "recvmsg",
        "send",
        "sendall",
        "sendto",
        "sendmsg",
    ),
    -1,
)

_add("time", "time", "sleep", _p_sleep, "seconds > 0", shape=1)
_add("builtins", "builtins", "input")
_add("builtins", "builtins", "open", _p_open, "a path, not an existing file descriptor")
_add("builtins", "io", "open", _p_open, "a path, not an existing file descriptor")

for _m in (
    "connect",
    "connect_ex",
    "accept",
    "recv",
    "recv_into",
    "recvfrom",
    "recvfrom_into",
    "recvmsg",
    "recvmsg_into",
    "send",
    "sendall",
    "sendto",
    "sendmsg",
    "sendfile",
):
    _add("socket", "socket", f"socket.{_m}", _p_socket, _NONBLOCKING, shape=_SOCKET_SHAPES.get(_m))
for _m in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
    _add("socket", "socket", _m)
_add("socket", "socket", "getfqdn")
_add("socket", "socket", "create_connection")

for _m in ("do_handshake", "connect", "read", "write", "recv", "recv_into", "send", "sendall"):
    _add("ssl", "ssl", f"SSLSocket.{_m}", _p_socket, _NONBLOCKING)

_add("os", "os", "open")
_add("os", "os", "read", _p_fd, "the file descriptor is in blocking mode")
_add("os", "os", "write", _p_fd, "the file descriptor is in blocking mode")
_add("os", "os", "sendfile", _p_sendfile, "the output descriptor is in blocking mode")
for _m in (
    "stat",
    "lstat",
    "listdir",
    "scandir",
    "access",
    "statvfs",
    "getcwd",
    "readlink",
    "mkdir",
    "makedirs",
    "rmdir",
    "remove",
    "unlink",
    "rename",
    "replace",
    "link",
    "symlink",
    "fsync",
    "system",
):
    _add("os", "os", _m)
_add("os", "os", "waitpid", _p_waitpid, "without os.WNOHANG")

for _m in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    _add("subprocess", "subprocess", _m)
_add("subprocess", "subprocess", "Popen.wait", _p_popen_wait, "the process is still running")
_add("subprocess", "subprocess", "Popen.communicate")

_add(
    "threading",
    "threading",
    "Lock",
    name="threading.Lock.acquire",
    make=lambda original: GuardedLock,
    when="the lock is held by another thread (locks made by threading.Lock())",
)
_add(
    "threading",
    "threading",
    "RLock",
    name="threading.RLock.acquire",
    make=_make_rlock,
    when="the lock is held by another thread (locks made by threading.RLock())",
)
_add(
    "threading",
    "threading",
    "Condition.__enter__",
    _p_condition_enter,
    "the condition's lock is held by another thread",
)
_add("threading", "threading", "Condition.wait", _p_timeout(1), "timeout is not 0")
_add("threading", "threading", "Event.wait", _p_event_wait, "the event is not set")
_add("threading", "threading", "Semaphore.acquire", _p_semaphore, "no slot is free")
_add("threading", "threading", "Semaphore.__enter__", _p_semaphore, "no slot is free")
_add("threading", "threading", "Barrier.wait", _p_barrier_wait, "others have yet to arrive")
_add("threading", "threading", "Thread.join", _p_join, "the thread is alive")
_add("queue", "queue", "Queue.get", _p_queue_get, "the queue is empty")
_add("queue", "queue", "Queue.put", _p_queue_put, "the queue is bounded and full")
_add(
    "concurrent.futures",
    "concurrent.futures",
    "Future.result",
    _p_future,
    "the future is not done",
)
_add(
    "concurrent.futures",
    "concurrent.futures",
    "Future.exception",
    _p_future,
    "the future is not done",
)

_add("select", "select", "select", _p_select, "timeout is not 0")
_add(
    "select",
    "select",
    "poll",
    name="select.poll.poll",
    make=_make_poll,
    when="timeout is not 0 (poll objects made by select.poll())",
)

_add("sqlite3", "sqlite3", "connect", make=_make_sqlite_connect)
for _m in _SQLITE_CONN_METHODS:
    _add("sqlite3", "sqlite3", f"Connection.{_m}", via=True, when="connections from connect()")
for _m in _SQLITE_CURSOR_METHODS:
    _add("sqlite3", "sqlite3", f"Cursor.{_m}", via=True, when="connections from connect()")

for _m in ("connect", "request", "getresponse"):
    _add("http", "http.client", f"HTTPConnection.{_m}")
_add("http", "http.client", "HTTPResponse.read")
_add("http", "urllib.request", "urlopen")
_add("http", "urllib.request", "urlretrieve")
_add("http", "urllib.request", "OpenerDirector.open")

# Third-party sync clients, patched when (and if) they are imported.
_add("clients", "requests.sessions", "Session.request", name="requests.Session.request")
_add(
    "clients",
    "urllib3.connectionpool",
    "HTTPConnectionPool.urlopen",
    name="urllib3.HTTPConnectionPool.urlopen",
)
_add("clients", "urllib3.poolmanager", "PoolManager.urlopen", name="urllib3.PoolManager.urlopen")
_add("clients", "httpx", "Client.send")
_add("clients", "redis.client", "Redis.execute_command", name="redis.Redis.execute_command")
_add("clients", "redis.client", "Pipeline.execute", name="redis.Pipeline.execute")
_add("clients", "psycopg2", "connect", make=_make_pg_connect)
for _m in _PG_CONN_METHODS:
    _add("clients", "psycopg2", f"connection.{_m}", via=True, when="connections from connect()")
for _m in _PG_CURSOR_METHODS:
    _add("clients", "psycopg2", f"cursor.{_m}", via=True, when="connections from connect()")

# Not catalogue entries: they tell the fast path which threads run trio.
_LOOP_TARGETS: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {
    "trio": [("run", _make_trio_run), ("lowlevel.start_guest_run", _make_trio_guest)],
}


def catalogue() -> tuple[CatalogueEntry, ...]:
    """Every call the guard checks, in catalogue order."""
    return tuple(t.entry for t in _TARGETS)


# -- activation -------------------------------------------------------------------------

_lifecycle = threading.RLock()
_patches: dict[str, list[ReplacePatch]] = {}
_hooks: list[tuple[str, Callable[[ModuleType], None]]] = []


def _by_module() -> dict[str, list[tuple[str, Callable[[Any], Any]]]]:
    out: dict[str, list[tuple[str, Callable[[Any], Any]]]] = collections.defaultdict(list)
    for target in _TARGETS:
        if target.make is not None:
            out[target.entry.module].append((target.entry.target, target.make))
    for module, items in _LOOP_TARGETS.items():
        out[module].extend(items)
    return dict(out)


def _patch_module(name: str, targets: list[tuple[str, Callable[[Any], Any]]], module: Any) -> None:
    with _lifecycle:
        if not _guards or name in _patches:
            return
        done: list[ReplacePatch] = []
        _patches[name] = done
        for path, make in targets:
            owner_path, _, attr = path.rpartition(".")
            owner = module
            try:
                for part in filter(None, owner_path.split(".")):
                    owner = getattr(owner, part)
                if not hasattr(owner, attr):
                    continue  # not on this platform or version
                patch = ReplacePatch(owner, attr, make)
                patch.activate()
            except Exception:
                logger.warning("loopguard could not guard %s.%s", name, path, exc_info=True)
                continue
            done.append(patch)


def _hooks_on() -> None:
    for name, targets in _by_module().items():
        hook = functools.partial(_patch_module, name, targets)
        _hooks.append((name, hook))
        when_imported(name, hook)


def _hooks_off() -> None:
    for name, hook in reversed(_hooks):
        cancel_import_hook(name, hook)
    _hooks.clear()
    for patches in reversed(list(_patches.values())):
        for patch in reversed(patches):
            patch.deactivate()
    _patches.clear()


# -- reporting off the loop thread ------------------------------------------------------


class _Reporter:
    """Hands events to sinks on a thread of its own, so sinks never run on the loop."""

    def __init__(self) -> None:
        import queue

        self._queue: queue.SimpleQueue[tuple[Sink, Any] | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = _thread.allocate_lock()

    def put(self, sink: Sink, event: BlockingCall) -> None:
        self._queue.put((sink, event))
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._main, name="loopguard-reporter", daemon=True
            )
            self._thread.start()

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            sink, event = item
            try:
                sink.emit(event)
            except Exception:
                logger.exception("loopguard could not report a blocking call")

    def flush(self, timeout: float) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)


_reporter = _Reporter()


def _flush_reporter(timeout: float) -> bool:
    state = _state
    busy, state.busy = state.busy, True  # our own wait is never a finding
    try:
        return _reporter.flush(timeout)
    finally:
        state.busy = busy


# -- the guard ---------------------------------------------------------------------------


class BlockingGuard:
    """Reports blocking calls made on event loop threads; a context manager.

    ``install(blocking=...)`` runs one for the process-wide watchdog, and the pytest
    plugin runs one per session; create your own to check one piece of code::

        with loopguard.BlockingGuard("raise"):
            asyncio.run(main())  # BlockingCallError at the first blocking call

    Several guards may run at once; each applies its own mode and rules to every
    call, and the catalogue stays patched while any of them runs.

    Args:
        mode: ``"warn"`` (log and report each call with its duration),
            ``"raise"`` (refuse the call with :class:`BlockingCallError`),
            ``"record"`` (report without logging) or ``"off"``.
        allow: Further allow rules (:class:`Allow` or text such as
            ``"myapp.cache:warm_up"``), on top of the defaults.
        defaults: Apply loopguard's default rules (imports, logging, the loops'
            own plumbing; see :data:`DEFAULT_ALLOW`).
        sinks: Where events go, on a reporter thread (never on the loop thread).
        log: Log through a :class:`~loopguard.LoggingSink` (``warn`` and ``raise``
            events; deduplicated and rate-limited).
        listeners: Called with every event at once, on the loop thread: they must
            be quick (append to a list) and never block.
        record: How many recent events :attr:`events` keeps.
        rate_limit: ``(window, burst)``: events per calling line sent to sinks per
            window; further calls from that line are counted in the next event's
            ``suppressed``. ``None``: no limit. Listeners and :attr:`events` see
            every call.
        scope: Modules (dotted names; submodules count) whose blocking calls the
            mode applies to: a call with no frame of these modules on its stack is
            only recorded (``action="record"``), never refused or logged. Empty:
            every call.

    Raises:
        ValueError: An invalid mode or allow rule.
    """

    DEFAULT_ALLOW: ClassVar[tuple[Allow, ...]] = DEFAULT_ALLOW

    def __init__(
        self,
        mode: Mode = "warn",
        *,
        allow: Iterable[str | Allow] = (),
        defaults: bool = True,
        sinks: Sequence[Sink] = (),
        log: bool = False,
        listeners: Iterable[Callable[[BlockingCall], object]] = (),
        record: int = 1000,
        rate_limit: tuple[float, int] | None = (60.0, 10),
        scope: Iterable[str] = (),
    ) -> None:
        self.mode = mode
        self.scope = tuple(scope)
        user = tuple(Allow.parse(rule) for rule in allow)
        self._defaults = DEFAULT_ALLOW if defaults else ()
        self._rules: tuple[Allow, ...] = self._defaults + user
        self._hits = dict.fromkeys(self._rules, 0)
        self._scoped: tuple[Allow, ...] = ()
        sink_list: list[Sink] = list(sinks)
        if log:
            sink_list.append(LoggingSink())
        self._sinks = SinkSet(sink_list) if sink_list else None
        self._listeners: tuple[Callable[[BlockingCall], object], ...] = tuple(listeners)
        self._recorded: collections.deque[BlockingCall] = collections.deque(maxlen=record)
        if rate_limit is not None and (rate_limit[0] <= 0 or rate_limit[1] < 1):
            raise ValueError(f"rate_limit must be (window > 0, burst >= 1), got {rate_limit!r}")
        self._limit = rate_limit
        self._sites: collections.OrderedDict[tuple[str, CodeType, int], list[Any]] = (
            collections.OrderedDict()
        )
        self._lock = _thread.allocate_lock()
        self.running = False

    @property
    def mode(self) -> Mode:
        """The current mode; may be changed while the guard runs."""
        return self._mode  # type: ignore[return-value]

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"blocking must be one of {', '.join(_MODES)}; got {mode!r}")
        self._mode: str = mode

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> BlockingGuard:
        """Patch the catalogue (if no guard did yet) and start reporting."""
        global _guards
        with _lifecycle:
            if self.running:
                return self
            _guards = (*_guards, self)
            self.running = True
            if len(_guards) == 1:
                try:
                    _hooks_on()
                except BaseException:
                    _guards = ()
                    self.running = False
                    _hooks_off()
                    raise
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reporting; the last guard to stop restores every original.

        Args:
            timeout: Seconds to wait for events still on their way to the sinks.
        """
        global _guards
        with _lifecycle:
            if not self.running:
                return
            self.running = False
            _guards = tuple(g for g in _guards if g is not self)
            if not _guards:
                _hooks_off()
        if self._sinks is not None:
            self.flush(timeout)

    def __enter__(self) -> BlockingGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until events reported so far have reached the sinks.

        Returns:
            False if they had not after ``timeout`` seconds.
        """
        return _flush_reporter(timeout)

    # -- results -----------------------------------------------------------------------

    @property
    def events(self) -> list[BlockingCall]:
        """The most recent blocking calls this guard saw, oldest first."""
        with self._lock:
            return list(self._recorded)

    def clear(self) -> None:
        """Forget the recorded events (rule hit counts are kept)."""
        with self._lock:
            self._recorded.clear()

    def rules(self, *, reset: bool = False) -> list[RuleHits]:
        """Every allow rule with how many calls it let through (``0``: never fired).

        Scoped rules (:attr:`scoped_rules`) are listed once they were set.

        Args:
            reset: Start counting afresh after reading.
        """
        defaults = set(self._defaults)
        with self._lock:
            rows = [RuleHits(rule, hits, rule in defaults) for rule, hits in self._hits.items()]
            if reset:
                self._hits = dict.fromkeys(self._hits, 0)
        return rows

    def rules_report(self, *, defaults: bool = False) -> str:
        """The rule report as text: which rules fired, how often, and which never did.

        Args:
            defaults: Also list loopguard's default rules.
        """
        return format_rules(self.rules(), defaults=defaults)

    @staticmethod
    def catalogue() -> tuple[CatalogueEntry, ...]:
        """Every call the guard checks, in catalogue order."""
        return catalogue()

    @property
    def scoped_rules(self) -> tuple[Allow, ...]:
        """Rules for the current scope only (one test, one request), tried after the others."""
        return self._scoped

    @scoped_rules.setter
    def scoped_rules(self, rules: Iterable[str | Allow]) -> None:
        scoped = tuple(Allow.parse(rule) for rule in rules)
        with self._lock:
            for rule in scoped:
                self._hits.setdefault(rule, 0)
        self._scoped = scoped

    def add_listener(self, listener: Callable[[BlockingCall], object]) -> None:
        """Call ``listener`` with every later event, on the loop thread (keep it quick)."""
        self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Callable[[BlockingCall], object]) -> None:
        """Stop calling ``listener`` (no-op if it was not added)."""
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    # -- called by the slow path (on the loop thread, with the re-entrancy flag set) --

    @property
    def scope(self) -> tuple[str, ...]:
        """Modules whose calls the mode applies to (empty: all); may be changed while running."""
        return self._scope

    @scope.setter
    def scope(self, modules: Iterable[str]) -> None:
        names = tuple(modules)
        for name in names:
            if not isinstance(name, str) or not name.strip(". "):
                raise ValueError(f"scope: a dotted module name, got {name!r}")
        self._scope = names

    def _in_scope(self, stack: _StackInfo) -> bool:
        scope = self._scope
        return not scope or any(
            m == s or m.startswith(s + ".") for m, _ in stack.rows() for s in scope
        )

    def _allows(self, call: str, stack: _StackInfo) -> bool:
        for rule in self._rules + self._scoped if self._scoped else self._rules:
            if not rule.applies_to(call):
                continue
            if rule.direct:
                hit = rule.matches(*stack.first)
            else:
                hit = any(rule.matches(m, q) for m, q in stack.rows())
            if hit:
                with self._lock:
                    self._hits[rule] += 1
                return True
        return False

    def _admit(self, key: tuple[str, CodeType, int]) -> int | None:
        """Rate limit per calling line: ``None`` if sinks skip this one, else the skipped count."""
        if self._limit is None:
            return 0
        window, burst = self._limit
        now = time.monotonic()
        with self._lock:
            site = self._sites.get(key)
            if site is None or now - site[0] >= window:
                skipped = site[2] if site is not None else 0
                self._sites[key] = [now, 1, 0]
                self._sites.move_to_end(key)
                while len(self._sites) > 1000:
                    self._sites.popitem(last=False)
                return int(skipped)
            if site[1] < burst:
                site[1] += 1
                skipped, site[2] = site[2], 0
                return int(skipped)
            site[2] += 1
            return None

    def _deliver(self, event: BlockingCall, *, to_sinks: bool) -> None:
        with self._lock:
            self._recorded.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("loopguard blocking-call listener %r raised", listener)
        if to_sinks and self._sinks is not None:
            _reporter.put(self._sinks, event)


def call_during(ident: int, start: float, end: float, share: float) -> str | None:
    """The reported blocking call that held thread ``ident`` for most of a stall.

    Args:
        ident: The loop thread.
        start: When the stall began (monotonic clock).
        end: When it ended.
        share: The part of the stall the call must cover.

    Returns:
        The call's catalogue name, or ``None`` when no reported call explains the stall.
    """
    for thread, ended, took, name in reversed(list(_recent)):
        if thread == ident and start <= ended <= end and took >= share * (end - start):
            return name
    return None


def running_guards() -> tuple[BlockingGuard, ...]:
    """The guards running now (for tests and diagnostics)."""
    return _guards


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child: locks another thread held at fork
    # time would never be released, and other threads' trio runs are gone.
    global _lifecycle, _trio_lock, _reporter
    _lifecycle = threading.RLock()
    _trio_lock = _thread.allocate_lock()
    me = _get_ident()
    for ident in [i for i in _trio_threads if i != me]:
        _trio_threads.pop(ident, None)
    _reporter = _Reporter()
    for guard in _guards:
        guard._lock = _thread.allocate_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
