"""What the pytest plugin decides about a finding: scope, trimmed stacks, pending tasks.

The plugin's hooks live in :mod:`loopguard.pytest_plugin`; this module holds the
rules they apply, so that the plugin module stays a readable list of hooks:

* :class:`Scope`: the code under test (by default the packages found in the
  rootdir), whose blocking calls and stalls fail tests;
* :func:`trimmed`: events without the frames above the loop (pytest itself);
* :func:`asyncio_tasks` and :func:`describe_tasks`: the pending-task check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ._core.frames import callback_frames, culprit_of, where
from .events import BlockingCall, Event, Frame, StackSample, Stall

__all__ = ["Scope", "asyncio_tasks", "describe_tasks", "trimmed"]


# Directories at the rootdir that hold tests, docs or tools rather than the code under test.
_NOT_SCOPE = frozenset(
    {"tests", "test", "testing", "docs", "doc", "benchmarks", "bench", "examples", "scripts"}
)


@dataclass(frozen=True)
class Scope:
    """The code under test: failures are limited to blocking and stalls in it."""

    modules: tuple[str, ...]  # empty: all code
    origin: str = ""

    @classmethod
    def configured(cls, names: Sequence[str], rootdir: Any) -> Scope:
        names = [n.strip() for n in names if n.strip()]
        if "*" in names:
            return cls((), "all code: loopguard_scope = *")
        if not names:
            found = _packages_at(Path(rootdir))
            if not found:
                return cls((), "all code: no package found in the rootdir")
            return cls(tuple(found), "packages found in the rootdir")
        for name in names:
            if not all(part.isidentifier() for part in name.split(".")):
                raise pytest.UsageError(f"loopguard_scope: not a module name: {name!r}")
        return cls(tuple(names), "loopguard_scope")

    def __str__(self) -> str:
        return f"{', '.join(self.modules)} ({self.origin})" if self.modules else self.origin

    def _dirs(self) -> list[str]:
        """Where the scope's modules live now (as imported, else as importable)."""
        dirs: list[str] = []
        for name in self.modules:
            module = sys.modules.get(name)
            places = list(getattr(module, "__path__", None) or [])
            if not places and getattr(module, "__file__", None):
                places = [module.__file__]  # type: ignore[union-attr]
            if module is None:
                with contextlib.suppress(Exception):
                    spec = importlib.util.find_spec(name)
                    if spec is not None:
                        places = list(spec.submodule_search_locations or [spec.origin or ""])
            dirs.extend(os.path.realpath(p) for p in places if p)
        return dirs

    def holds(self, stall: Stall) -> bool:
        """True when the stall's stack (or the GIL hog's) runs code in scope."""
        if not self.modules:
            return True
        frames = list(stall.stacks[0].frames) if stall.stacks else []
        if stall.hog is not None:
            frames.extend(stall.hog.frames)
        dirs = self._dirs()
        for frame in frames:
            path = os.path.realpath(frame.file)
            if any(path == d or path.startswith(d + os.sep) for d in dirs):
                return True
        return False


def _packages_at(root: Path) -> list[str]:
    found: list[str] = []
    for base in (root, root / "src"):
        try:
            children = sorted(base.iterdir())
        except OSError:
            continue
        for child in children:
            if (
                child.is_dir()
                and child.name.isidentifier()
                and child.name not in _NOT_SCOPE
                and not child.name.startswith(("test_", "."))
                and (child / "__init__.py").is_file()
            ):
                found.append(child.name)
    return found


def trimmed(events: Sequence[Event]) -> list[Event]:
    """Drop the frames above the loop (pytest, the test runner) from events' stacks."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, BlockingCall):
            event = dataclasses.replace(event, stack=callback_frames(event.stack))
        elif isinstance(event, Stall) and event.stacks:
            event = dataclasses.replace(
                event,
                stacks=tuple(StackSample(s.count, callback_frames(s.frames)) for s in event.stacks),
            )
        out.append(event)
    return out


def asyncio_tasks() -> set[asyncio.Task[Any]] | None:
    try:
        return asyncio.all_tasks()
    except RuntimeError:
        return None  # not on an asyncio loop (trio)


def describe_tasks(tasks: list[asyncio.Task[Any]]) -> str:
    lines = [f"loopguard: {len(tasks)} task(s) still pending when the test ended:"]
    for task in tasks[:20]:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", type(coro).__name__)
        stack = tuple(
            Frame(f.f_code.co_filename, f.f_lineno or 0, f.f_code.co_name) for f in task.get_stack()
        )
        at = culprit_of(stack)
        suspended = f", suspended at {where(at)}" if at is not None else ""
        lines.append(f"  task {task.get_name()!r} running {name}(){suspended}")
    if len(tasks) > 20:
        lines.append(f"  ... {len(tasks) - 20} more")
    return "\n".join(lines)
