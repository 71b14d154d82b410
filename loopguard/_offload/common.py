"""Names every module of the offload subsystem shares.

It owns the default time budget, the modes a call can run in, the attribute that
marks an ``@offload`` wrapper, and how a function is named in messages and events.
It imports nothing else from the subsystem.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["DEFAULT_BUDGET", "WRAPPER_ATTR", "Mode", "qualified_name"]

Mode = Literal["thread", "process", "executor"]

DEFAULT_BUDGET: Final = 0.005
"""Seconds a call may hold the loop: adaptive ``@offload``'s and :func:`yielding`'s default."""

WRAPPER_ATTR: Final = "_loopguard_offload"
"""Set on every ``@offload`` wrapper; the value is the function's :class:`Runner`."""


def qualified_name(func: object) -> str:
    """Return ``module.qualname`` of ``func`` (or of its type, for a callable object)."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{qualname}" if module else qualname
