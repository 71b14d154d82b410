"""The guard: :class:`BlockingGuard`, its lifecycle, and what it does with a finding.

A :class:`BlockingGuard` holds a mode, allow rules, a scope, sinks, listeners and a
rate limit. Starting the first guard patches the catalogue (:mod:`.table`); stopping
the last one puts every original back. While guards run, the slow path
(:mod:`.check`) asks each of them about a blocking call and hands each its event
(:meth:`BlockingGuard._deliver`): recorded, given to listeners at once, and queued for
the sinks on the reporter thread (:mod:`.reporter`). Fork handling for the whole
subsystem lives here too: in a child process only the forking thread survives.
"""

from __future__ import annotations

import _thread
import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import CodeType
from typing import Any, ClassVar, Literal, cast, get_args

from ..events import BlockingCall
from ..sinks import LoggingSink, Sink, SinkSet
from . import reporter, trio_runs
from .check import _running, _StackInfo, _state
from .reporter import _reporter
from .rules import DEFAULT_ALLOW, Allow, RuleHits, format_rules
from .table import CatalogueEntry, _hooks_off, _hooks_on, catalogue

__all__ = ["BlockingGuard", "Mode", "running_guards"]

logger = logging.getLogger("loopguard")

#: The guard's modes, defined here once (the CLI, the plugin and Config use these).
Mode = Literal["off", "warn", "raise", "record"]
_MODES: tuple[str, ...] = get_args(Mode)


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
        running = _running
        with running.lock:
            if self.running:
                return self
            running.guards = (*running.guards, self)
            self.running = True
            if len(running.guards) == 1:
                try:
                    _hooks_on()
                except BaseException:
                    running.guards = ()
                    self.running = False
                    _hooks_off()
                    raise
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reporting; the last guard to stop restores every original.

        Args:
            timeout: Seconds to wait for events still on their way to the sinks.
        """
        running = _running
        with running.lock:
            if not self.running:
                return
            self.running = False
            running.guards = tuple(g for g in running.guards if g is not self)
            if not running.guards:
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
        state = _state
        busy, state.busy = state.busy, True  # our own wait is never a finding
        try:
            return _reporter.flush(timeout)
        finally:
            state.busy = busy

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


def running_guards() -> tuple[BlockingGuard, ...]:
    """The guards running now (for tests and diagnostics)."""
    return cast("tuple[BlockingGuard, ...]", _running.guards)


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child: locks another thread held at fork
    # time would never be released, and other threads' trio runs are gone.
    _running.lock = threading.RLock()
    trio_runs._after_fork_in_child()
    reporter._after_fork_in_child()
    for guard in running_guards():
        guard._lock = _thread.allocate_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
