"""Frames: which code is loopguard's own, which is plumbing, and which line to blame.

This module owns two rules every subsystem uses:

* **Own code.** :func:`own_part` says which part of loopguard a code file belongs to
  (``"_blocking"``, ``"_watchdog"``, ``"sinks"``, ...), or ``None`` for code that is
  not loopguard's: user code, and loopguard's own demo application. Nothing else in
  the package recognises its frames by file name or by module globals.
* **User code.** A frame is *plumbing* when it belongs to loopguard itself, to the
  standard library, or to an event-loop framework (asyncio, uvloop, anyio, trio,
  sniffio, and pytest's runner). A frame in another installed package is *library*
  code; anything else is the user's. The culprit of a stack is its deepest user frame,
  else its deepest library frame, else its deepest frame.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from types import FrameType

from ..events import Frame, short_path

__all__ = [
    "LIBRARY",
    "MAX_DEPTH",
    "PLUMBING",
    "USER",
    "callback_frames",
    "capture",
    "classify",
    "culprit_of",
    "display_path",
    "is_idle",
    "is_own",
    "own_part",
    "where",
]

#: Frames kept per sample (the innermost ones: that is where the culprit is).
MAX_DEPTH = 64

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Modules of loopguard that are applications, not instrumentation: user code.
_APP_MODULES = frozenset({"_demo"})


@lru_cache(maxsize=4096)
def own_part(filename: str) -> str | None:
    """The part of loopguard a code file belongs to, or ``None`` if it is not loopguard's.

    The part is the subpackage or top-level module (``"_blocking"``, ``"_watchdog"``,
    ``"_core"``, ``"sinks"``, ...). Code generated at run time names a file inside the
    part that generated it. loopguard's demo application counts as user code.
    """
    if filename.startswith("<"):
        return None
    path = os.path.abspath(filename)
    if not path.startswith(_PACKAGE_DIR):
        return None
    part = path[len(_PACKAGE_DIR) :].split(os.sep, 1)[0]
    part = part[:-3] if part.endswith(".py") else part
    return None if part in _APP_MODULES else part


def is_own(filename: str) -> bool:
    """True when a code file is loopguard's own instrumentation (see :func:`own_part`)."""
    return own_part(filename) is not None


def where(frame: Frame) -> str:
    """``file:line in function``, the file shortened by :func:`display_path`."""
    return f"{display_path(frame.file)}:{frame.line} in {frame.function}"


def display_path(path: str) -> str:
    """A code file's path as a reader wants it: as short as it stays unambiguous.

    An installed package's file is shown from its package (``requests/api.py``), a
    standard-library file from the library (``http/client.py``), any other file
    relative to the current directory if under it, else relative to the longest
    ``sys.path`` entry that holds it, else as given.
    """
    return _display_path(path, os.getcwd(), tuple(sys.path))


@lru_cache(maxsize=4096)
def _display_path(path: str, cwd: str, search: tuple[str, ...]) -> str:
    if path.startswith("<"):
        return path
    full = os.path.abspath(path)
    site = _site_of(full)
    if site is not None:
        return full[len(site) :]
    stdlib = next((p for p in _STDLIB if full.startswith(p)), None)
    if stdlib is not None:
        return full[len(stdlib) :]
    if full.startswith(cwd + os.sep):
        return full[len(cwd) + 1 :]
    roots = sorted({os.path.abspath(p or cwd) + os.sep for p in search}, key=len, reverse=True)
    root = next((r for r in roots if full.startswith(r) and r != os.sep), None)
    if root is not None:
        return full[len(root) :]
    return short_path(path)


def _site_of(path: str) -> str | None:
    """The site-packages directory (with its separator) that holds ``path``, if any."""
    site = next((p for p in _SITE if path.startswith(p)), None)
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if site is None and marker in path:
            site = path[: path.index(marker) + len(marker)]
    return site


_LOOP_PACKAGES = ("asyncio", "uvloop", "anyio", "trio", "sniffio", "_pytest", "pluggy")


def _prefixes(*keys: str) -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    seen = {os.path.abspath(paths[k]) + os.sep for k in keys if k in paths}
    return tuple(sorted(seen, key=len, reverse=True))


_STDLIB = _prefixes("stdlib", "platstdlib")
_SITE = _prefixes("purelib", "platlib")

PLUMBING, LIBRARY, USER = 0, 1, 2


@lru_cache(maxsize=4096)
def classify(filename: str) -> int:
    """Return ``PLUMBING``, ``LIBRARY`` or ``USER`` for a code object's file name."""
    if filename.startswith("<"):
        return PLUMBING if filename.startswith("<frozen") else USER
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return PLUMBING if is_own(filename) else USER
    site = _site_of(path)
    if site is not None:
        top = path[len(site) :].split(os.sep, 1)[0]
        return PLUMBING if top in _LOOP_PACKAGES else LIBRARY
    if any(path.startswith(p) for p in _STDLIB):
        return PLUMBING
    return USER


def _function_name(frame: FrameType) -> str:
    code = frame.f_code
    return getattr(code, "co_qualname", code.co_name)


def capture(frame: FrameType | None, max_depth: int = MAX_DEPTH) -> tuple[Frame, ...]:
    """Reduce a live frame chain to a stack of :class:`Frame`, outermost first.

    Args:
        frame: The innermost frame (e.g. from ``sys._current_frames()``).
        max_depth: How many of the innermost frames to keep.

    Returns:
        The frames, innermost last. No frame object is retained.
    """
    out: list[Frame] = []
    while frame is not None and len(out) < max_depth:
        out.append(Frame(frame.f_code.co_filename, frame.f_lineno or 0, _function_name(frame)))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


def _is_dispatch(frame: Frame) -> bool:
    # The frame below which the loop runs callbacks: the watchdog's run_forever wrapper
    # (asyncio, uvloop) or trio's run loop.
    if frame.function == "_run_forever":
        return own_part(frame.file) == "_watchdog"
    return frame.function == "unrolled_run" and frame.file.endswith(
        os.path.join("trio", "_core", "_run.py")
    )


def callback_frames(stack: tuple[Frame, ...]) -> tuple[Frame, ...]:
    """Return the part of a loop thread's stack run by the loop (below its dispatch).

    Frames above the dispatch (``asyncio.run(main())`` and its callers) never
    explain a stall. When no dispatch frame is found the whole stack is returned.
    """
    for i in range(len(stack) - 1, -1, -1):
        if _is_dispatch(stack[i]):
            return stack[i + 1 :]
    return stack


_WAITS = frozenset({"select", "poll", "control", "get_events", "_run_once", "run_forever"})


def is_idle(stack: tuple[Frame, ...]) -> bool:
    """True when the loop thread's stack shows no user or library code in a callback.

    That is a loop waiting in ``select()`` (or for the GIL to come back from it).
    """
    if not stack:
        return True
    if any(_is_dispatch(f) for f in stack):
        return all(classify(f.file) == PLUMBING for f in callback_frames(stack))
    inner = stack[-1]
    return classify(inner.file) == PLUMBING and inner.function.rsplit(".", 1)[-1] in _WAITS


def culprit_of(stack: Iterable[Frame]) -> Frame | None:
    """Return the frame to blame in a stack (innermost last), per the module rule."""
    best: Frame | None = None
    best_rank = -1
    for frame in stack:
        rank = classify(frame.file)
        if rank >= best_rank:
            best, best_rank = frame, rank
    return best
