"""What ``loopguard run`` does inside the watched process at interpreter start.

Reads ``LOOPGUARD_*``, installs the process-wide watchdog, reports each stall on
stderr as it ends and, at exit, prints a summary: stalls by culprit and loop delay.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

from ._api import install_config
from ._core.frames import where
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
        atexit.register(_print_summary, wd)
    return wd


_MAX_ROWS = 20


def _capped(rows: list[str], noun: str) -> list[str]:
    """The first rows of a summary table, and how many more there were."""
    if len(rows) <= _MAX_ROWS:
        return rows
    return [*rows[:_MAX_ROWS], f"  ... {len(rows) - _MAX_ROWS} more {noun}"]


def _print_summary(wd: Watchdog) -> None:
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
    rows = wd.summary.rows()
    count = sum(r.count for r in rows)
    total = sum(r.total for r in rows)
    lines = [f"loopguard summary (pid {os.getpid()}): {count} stall(s), {total:.2f} s stalled"]
    if rows:
        lines.append(f"  {'count':>5}  {'total':>8}  {'max':>8}  culprit")
        lines += _capped(
            [
                f"  {r.count:>5}  {r.total:>7.3f}s  {r.max:>7.3f}s  "
                + (where(r.culprit) if r.culprit else "(not sampled / other)")
                for r in rows
            ],
            "culprits",
        )
    for r in wd.summary.startup_rows():
        lines.append(
            f"  start-up (import inside the loop): {r.count} stall(s), {r.total:.3f} s, at "
            + (where(r.culprit) if r.culprit else "(not sampled)")
        )
    calls = wd.summary.call_rows()
    if calls:
        lines.append(f"  {sum(c.count for c in calls)} blocking call(s) on the loop thread")
        lines.append(f"  {'count':>5}  {'total':>8}  call, culprit")
        lines += _capped(
            [
                f"  {c.count:>5}  {c.total:>7.3f}s  {c.function}, "
                + (where(c.culprit) if c.culprit else "(unknown)")
                for c in calls
            ],
            "call sites",
        )
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
