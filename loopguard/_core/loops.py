"""Loop kinds: the one place that tells an asyncio loop from a uvloop one."""

from __future__ import annotations

from typing import Literal

__all__ = ["LOOP_KINDS", "LoopKind", "loop_kind"]

LoopKind = Literal["asyncio", "uvloop", "trio"]
LOOP_KINDS: tuple[LoopKind, ...] = ("asyncio", "uvloop", "trio")


def loop_kind(loop: object) -> LoopKind:
    """``"uvloop"`` for a uvloop loop, else ``"asyncio"`` (trio runs are not loop objects)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
