"""What ``loopguard run`` does inside the watched process at interpreter start.

Reads ``LOOPGUARD_*``, installs the process-wide watchdog, reports each stall on
stderr as it ends and, at exit, prints a summary: stalls by culprit and loop delay.

The summary is printed once per process, at interpreter exit or just before the
process re-raises a signal that will kill it. Servers do that on Ctrl-C: uvicorn
catches SIGINT, shuts down, then re-raises it with ``signal.raise_signal()``, and
under gunicorn its worker's SIGINT handler is the default one, so the worker dies of
the signal and no exit handler runs. A SIGTERM that finds its default action (uvicorn's
supervisor terminates workers that have already restored their handlers) is caught by a
handler installed at start: it prints the summary, waiting at most
``_SIGTERM_WAIT`` seconds for it, then restores the default action and re-raises the
signal, so the process still dies of SIGTERM.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from typing import Any

from ._api import install_config
from ._core.patch import Patch
from ._watchdog import Config, Watchdog

__all__ = ["boot", "format_summary"]


def boot() -> Watchdog | None:
    """Install from the environment; on bad configuration say why and run without it."""
    try:
        config = Config.from_env()
        wd = install_config(config)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"loopguard: {exc}; running without loopguard\n")
        return None
    log = logging.getLogger("loopguard")
    if not any(getattr(h, "_loopguard", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("loopguard[%(process)d]: %(message)s"))
        handler._loopguard = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False
        if log.level == logging.NOTSET or log.level > logging.WARNING:
            log.setLevel(logging.WARNING)
    if os.environ.get("LOOPGUARD_SUMMARY", "1") != "0":
        _summary_at_exit(wd)
    return wd


# Signals whose default action ends the process (and which servers re-raise).
_FATAL = frozenset(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP")
    if hasattr(signal, name)
)
_printed = threading.Event()
_patches: list[Patch] = []
# How long a SIGTERM waits for the summary before the process dies of it anyway.
_SIGTERM_WAIT = 2.0


def _summary_at_exit(wd: Watchdog) -> None:
    """Print the summary at exit, or before a signal sent to this process kills it."""
    atexit.register(_print_summary, wd)

    def before_raise_signal(wrapped: Any, _: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        if _kills_this_process(args[0] if args else kwargs.get("signalnum")):
            _print_summary(wd)
        return wrapped(*args, **kwargs)

    def before_kill(wrapped: Any, _: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        pid = args[0] if args else kwargs.get("pid")
        number = args[1] if len(args) > 1 else kwargs.get("signal")
        if pid == os.getpid() and _kills_this_process(number):
            _print_summary(wd)
        return wrapped(*args, **kwargs)

    _patches[:] = [
        Patch(signal, "raise_signal", before_raise_signal),
        Patch(os, "kill", before_kill),
    ]
    for patch in _patches:
        patch.activate()
    _summary_on_sigterm(wd)


def _summary_on_sigterm(wd: Watchdog) -> None:
    """Print the summary before a SIGTERM with the default action ends the process.

    Only when SIGTERM has its default action at start (a program's own handler, set
    before or after, wins) and only from the main thread, where handlers can be set.
    """

    def on_sigterm(signum: int, _frame: object) -> None:
        if not _printed.is_set():
            try:
                # A helper thread, so a lock held by the interrupted code cannot stall
                # the process's death for longer than the wait.
                helper = threading.Thread(
                    target=_print_summary, args=(wd,), name="loopguard-summary", daemon=True
                )
                helper.start()
                helper.join(_SIGTERM_WAIT)
            except Exception:  # no thread at shutdown: die without the summary
                _printed.set()  # nor try it here, through the raise_signal patch
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    try:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, on_sigterm)
    except (AttributeError, ValueError, OSError):  # no SIGTERM, or not settable here
        pass


def _kills_this_process(number: object) -> bool:
    """Whether this signal, delivered to this process now, ends it without running exit code."""
    try:
        return number in _FATAL and signal.getsignal(number) == signal.SIG_DFL  # type: ignore[arg-type]
    except Exception:  # never let a check break the program's own signal handling
        return False


def _print_summary(wd: Watchdog) -> None:
    if _printed.is_set():
        return
    _printed.set()
    for patch in _patches:
        patch.deactivate()
    # Stop first: a stall that ended just before exit is reported and counted.
    wd.stop()
    try:
        sys.stderr.write(format_summary(wd) + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def format_summary(wd: Watchdog) -> str:
    """Render the end-of-run summary of a watchdog.

    Args:
        wd: The watchdog whose stalls and loop delay to summarise.

    Returns:
        A multi-line string: stalls grouped by culprit (count, total, max), blocking
        calls grouped by call and culprit line (when the guard reported any) and
        loop delay percentiles.
    """
    count, total = wd.summary.totals()
    lines = [f"loopguard summary (pid {os.getpid()}): {count} stall(s), {total:.2f} s stalled"]
    lines += wd.summary.table_lines()
    delay = wd.delay()
    if delay.count:
        lines.append(
            f"  loop delay: p50 {delay.percentile(50) * 1e3:.2f} ms, "
            f"p99 {delay.percentile(99) * 1e3:.2f} ms, max {delay.max * 1e3:.1f} ms "
            f"over {delay.count} heartbeats"
        )
    else:
        lines.append("  loop delay: no heartbeat recorded (no loop ran for a full interval)")
    return "\n".join(lines)
