"""Watchdog configuration: one validated, frozen object, from keywords or environment.

Every option is declared once, as a field of :class:`Config`: its type and default,
and in the field's metadata how it is read from a ``LOOPGUARD_*`` variable and
offered as a ``loopguard run`` flag (:func:`env_options`). ``Config.from_env`` and the
CLI are derived from that declaration; ``install()`` and ``watch()`` spell the options
out for type checkers and editors, and a test checks them against it.

Invalid values raise :class:`ValueError` naming the field, at install time, so a
typo never turns into a silent no-op or a crash later.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, get_args

from .._blocking import Allow, Mode
from ..events import Event
from ..sinks import Sink

__all__ = ["ENV_PREFIX", "BLOCKING_MODES", "BlockingMode", "Config", "EnvOption", "env_options"]

BlockingMode = Mode
BLOCKING_MODES: tuple[str, ...] = get_args(Mode)
ENV_PREFIX = "LOOPGUARD_"
DEFAULT_THRESHOLD = 0.1
DEFAULT_INTERVAL = 0.02


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def _option(default: Any = None, *, env: Callable[[str], object] | None = None, **cli: Any) -> Any:
    """A :class:`Config` field; ``env`` parses its ``LOOPGUARD_*`` variable, ``cli`` its flag.

    ``cli`` holds ``argparse`` keywords (``help`` at least) for ``loopguard run``.
    """
    meta = {"env": env, "cli": cli or None}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


class EnvOption(NamedTuple):
    """One option that can be set from the environment (and perhaps from the CLI)."""

    name: str  # the Config field
    variable: str  # LOOPGUARD_NAME
    parse: Callable[[str], object]
    cli: dict[str, Any] | None  # argparse keywords of its ``loopguard run`` flag


def env_options() -> tuple[EnvOption, ...]:
    """Every :class:`Config` option that a ``LOOPGUARD_*`` variable can set, in order."""
    out = []
    for f in fields(Config):
        parse = f.metadata.get("env")
        if parse is not None:
            out.append(EnvOption(f.name, ENV_PREFIX + f.name.upper(), parse, f.metadata["cli"]))
    return tuple(out)


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
            from a capture of the process read from outside it: a helper process
            runs ``py-spy dump --nonblocking`` when the sampler cannot get the GIL.
            It never writes to or pauses the process. On by default where it can
            work (Linux, py-spy installed, reading allowed); elsewhere the reason is
            logged once and stalls keep their cause without the line.
        blocking: Blocking-call guard: ``"off"``, ``"warn"`` (log and report each
            blocking call made on a loop thread), ``"raise"`` (refuse it with
            ``BlockingCallError``) or ``"record"`` (report without logging).
        blocking_allow: Allow rules for the guard, on top of the defaults:
            ``Allow`` objects or text ``module[:function][@call,...]``.
        full_stacks: Show every frame of a stack in logged reports. By default the
            culprit's frame and the user's frames are shown and runs of other
            frames (the event loop, the standard library, installed packages,
            loopguard) are folded into one line naming their packages.
    """

    threshold: float = _option(
        DEFAULT_THRESHOLD,
        env=float,
        metavar="S",
        help="seconds the loop must be held to report a stall (default 0.1)",
    )
    interval: float | None = _option(
        env=float,
        metavar="S",
        help="heartbeat and sampling period (default min(0.02, threshold/4))",
    )
    log: bool = _option(True, env=_flag)
    json: str | os.PathLike[str] | None = _option(
        env=str, metavar="FILE", help="append one JSON object per event per line to FILE"
    )
    callback: Callable[[Event], object] | None = _option()
    sinks: Sequence[Sink] = _option(())
    record: int = _option(1000)
    stats: bool = _option(
        False,
        env=_flag,
        action="store_true",
        help="collect loop statistics: utilization, pending callbacks, tasks (metrics)",
    )
    precise: bool = _option(
        False,
        env=_flag,
        action="store_true",
        help="time every callback on asyncio's own loops; report slow ones (not uvloop)",
    )
    slow_callback: float | None = _option(
        env=float,
        metavar="S",
        help="with --precise: report callbacks longer than S (default threshold/2)",
    )
    gil_dump: bool = _option(
        True,
        env=_flag,
        action=argparse.BooleanOptionalAction,
        help="name the line of C code holding the GIL by reading the process from a "
        "helper process with py-spy (default on; --no-gil-dump turns it off)",
    )
    blocking: BlockingMode = _option(
        "off", env=str, choices=BLOCKING_MODES, help="blocking-call guard mode (default off)"
    )
    blocking_allow: Sequence[str | Allow] = _option(
        (),
        env=str.split,
        action="append",
        metavar="RULE",
        help="allow blocking calls under MODULE[:FUNCTION][@CALL,...] (repeatable)",
    )
    full_stacks: bool = _option(
        False,
        env=_flag,
        action="store_true",
        help="show every frame of a stack in reports (default: fold the frames of the "
        "event loop, the standard library and installed packages around the culprit)",
    )

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
        if self.blocking not in BLOCKING_MODES:
            raise ValueError(
                f"blocking must be one of {', '.join(BLOCKING_MODES)}; got {self.blocking!r}"
            )
        if isinstance(self.sinks, list):
            object.__setattr__(self, "sinks", tuple(self.sinks))
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

        One variable per option that has one (:func:`env_options`): the option's
        name in capitals, for example ``LOOPGUARD_THRESHOLD`` (seconds),
        ``LOOPGUARD_JSON`` (file), ``LOOPGUARD_LOG`` (``1``/``0``),
        ``LOOPGUARD_BLOCKING`` (``off|warn|raise|record``),
        ``LOOPGUARD_BLOCKING_ALLOW`` (allow rules separated by spaces).

        Raises:
            ValueError: A variable is unknown or has an invalid value (the message
                names the variable).
        """
        env = os.environ if environ is None else environ
        parsers = {o.variable[len(ENV_PREFIX) :]: o.parse for o in env_options()}
        # Set by the CLI for its own use (the summary, the OpenTelemetry outputs).
        internal = {"SUMMARY", "BOOTSTRAPPED", "OTEL", "PROMETHEUS"}
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
