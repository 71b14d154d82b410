"""Watchdog configuration: one validated, frozen object, from keywords or environment.

Invalid values raise :class:`ValueError` naming the field, at install time, so a
typo never turns into a silent no-op or a crash later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ._blocking import Allow
from .events import Event
from .sinks import Sink

__all__ = ["ENV_PREFIX", "BlockingMode", "Config"]

BlockingMode = Literal["off", "warn", "raise", "record"]
_BLOCKING_MODES = ("off", "warn", "raise", "record")
ENV_PREFIX = "LOOPGUARD_"
DEFAULT_THRESHOLD = 0.1
DEFAULT_INTERVAL = 0.02


@dataclass(frozen=True)
class Config:
    """Settings of a :class:`~loopguard.Watchdog`.

    Attributes:
        threshold: Seconds the loop must be held before it counts as a stall.
        interval: Heartbeat period and sampling interval, in seconds; must be
            smaller than ``threshold``. Default: ``min(0.02, threshold / 4)``.
        log: Log each stall through the ``loopguard`` logger (rate-limited).
        json: Append every event as a JSON line to this file.
        callback: Call this function with every event (on the sampler thread).
        sinks: Further sinks to receive every event.
        record: How many recent events to keep in memory (``Watchdog.events``).
        stats: Collect loop statistics (busy/idle time, pending callbacks, tasks);
            costs a timer read per loop iteration, so it is off by default.
        precise: Time every callback on asyncio's own loops and report callbacks
            longer than ``slow_callback`` as ``SlowCallback`` events.
        slow_callback: Seconds a callback may run before precise mode reports it
            (default ``threshold / 2``); must be smaller than ``threshold``.
        gil_dump: Name the line of C code that holds the GIL (and the GIL hog's line)
            through faulthandler's traceback dump, which needs no GIL. Off by
            default: the dump reads other threads' frames unlocked, which is safe
            while they wait for the GIL but can crash the process if it fires while
            they run Python: on a busy asyncio loop that keeps the sampler from the
            GIL, and after a pause of the whole process (SIGSTOP, a debugger, cgroup
            CPU throttling). A debugging aid, never for production. Without it,
            CPU clocks still give the cause and the hog thread, without the line.
        blocking: Blocking-call guard: ``"off"``, ``"warn"`` (log and report each
            blocking call made on a loop thread), ``"raise"`` (refuse it with
            ``BlockingCallError``) or ``"record"`` (report without logging).
        blocking_allow: Allow rules for the guard, on top of the defaults:
            ``Allow`` objects or text ``module[:function][@call,...]``.
    """

    threshold: float = DEFAULT_THRESHOLD
    interval: float | None = None
    log: bool = True
    json: str | os.PathLike[str] | None = None
    callback: Callable[[Event], object] | None = None
    sinks: Sequence[Sink] = field(default_factory=tuple)
    record: int = 1000
    stats: bool = False
    precise: bool = False
    slow_callback: float | None = None
    gil_dump: bool = False
    blocking: BlockingMode = "off"
    blocking_allow: Sequence[str | Allow] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        threshold = _number("threshold", self.threshold)
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0 seconds, got {self.threshold!r}")
        if self.interval is None:
            object.__setattr__(self, "interval", min(DEFAULT_INTERVAL, threshold / 4))
        interval = _number("interval", self.interval)
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {self.interval!r}")
        if interval >= threshold:
            raise ValueError(
                f"interval ({interval!r} s) must be smaller than threshold ({threshold!r} s)"
            )
        if self.slow_callback is not None:
            slow = _number("slow_callback", self.slow_callback)
            if not 0 < slow < threshold:
                raise ValueError(
                    f"slow_callback must be > 0 and smaller than threshold ({threshold!r} s), "
                    f"got {self.slow_callback!r}"
                )
        if self.blocking not in _BLOCKING_MODES:
            raise ValueError(
                f"blocking must be one of {', '.join(_BLOCKING_MODES)}; got {self.blocking!r}"
            )
        if isinstance(self.blocking_allow, str):
            object.__setattr__(self, "blocking_allow", (self.blocking_allow,))
        try:
            rules = tuple(Allow.parse(rule) for rule in self.blocking_allow)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"blocking_allow: {exc}") from None
        object.__setattr__(self, "blocking_allow", rules)
        if not isinstance(self.record, int) or self.record < 0:
            raise ValueError(f"record must be an int >= 0, got {self.record!r}")
        if self.callback is not None and not callable(self.callback):
            raise ValueError(f"callback must be callable, got {self.callback!r}")
        for sink in self.sinks:
            if not callable(getattr(sink, "emit", None)):
                raise ValueError(f"sinks: {sink!r} has no emit(event) method")

    @property
    def slow_threshold(self) -> float:
        """Seconds after which precise mode reports a callback."""
        return self.slow_callback if self.slow_callback is not None else self.threshold / 2

    @property
    def period(self) -> float:
        """The heartbeat period (equal to ``interval``)."""
        assert self.interval is not None
        return self.interval

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Config:
        """Build a config from keyword options, rejecting unknown names.

        Raises:
            ValueError: An option is unknown or has an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option {unknown[0]!r}; valid options: {', '.join(sorted(known))}"
            )
        return cls(**options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build a config from ``LOOPGUARD_*`` environment variables.

        ``LOOPGUARD_THRESHOLD``, ``LOOPGUARD_INTERVAL`` (seconds), ``LOOPGUARD_JSON``
        (file), ``LOOPGUARD_LOG`` (``1``/``0``), ``LOOPGUARD_BLOCKING``
        (``off|warn|raise|record``), ``LOOPGUARD_BLOCKING_ALLOW`` (allow rules
        separated by spaces), ``LOOPGUARD_PRECISE`` and ``LOOPGUARD_STATS``
        (``1``/``0``).

        Raises:
            ValueError: A variable is unknown or has an invalid value (the message
                names the variable).
        """
        env = os.environ if environ is None else environ
        parsers: dict[str, Callable[[str], object]] = {
            "THRESHOLD": float,
            "INTERVAL": float,
            "JSON": str,
            "LOG": _flag,
            "BLOCKING": str,
            "BLOCKING_ALLOW": str.split,
            "PRECISE": _flag,
            "STATS": _flag,
            "SLOW_CALLBACK": float,
            "GIL_DUMP": _flag,
        }
        internal = {"SUMMARY", "BOOTSTRAPPED"}  # set by the CLI for its own use
        options: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :]
            if name in internal:
                continue
            parse = parsers.get(name)
            if parse is None:
                valid = ", ".join(ENV_PREFIX + n for n in sorted(parsers))
                raise ValueError(f"unknown environment variable {key}; valid: {valid}")
            try:
                options[name.lower()] = parse(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r} is not a valid value") from None
        try:
            return cls(**options)
        except ValueError as exc:
            raise ValueError(f"{ENV_PREFIX}*: {exc}") from None


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    return float(value)


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)
