"""Attribution: which request a stall belonged to, read from the running task's context.

Applications (or an ASGI middleware) register context variables by name with
:func:`attribute`. When a stall begins, the sampler reads those variables, and only
those, from the context of the task that was running, converts each value with
``str()`` and truncates it, so a stall carries e.g. ``{"http.route": "/orders"}``
without ever holding the raw objects.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_VALUE_LENGTH",
    "TRACE_PARENT",
    "attribute",
    "attributes_of",
    "current_attributes",
    "unattribute",
]

#: The attribute that carries the blocked task's trace context, in W3C
#: ``traceparent`` form, when :mod:`loopguard.otel` registers it.
TRACE_PARENT = "traceparent"
#: Context variables that can be registered at once.
MAX_ATTRIBUTES = 16
#: Characters kept of each attribute value.
MAX_VALUE_LENGTH = 128

Convert = Callable[[Any], "str | None"]
"""Turns a variable's value into the attribute's text (``None``: leave it out)."""

# name -> (variable, how its value becomes text)
_registry: dict[str, tuple[contextvars.ContextVar[Any], Convert]] = {}
_lock = threading.Lock()


def _text(value: Any) -> str:
    return str(value)


def attribute(name: str, var: contextvars.ContextVar[Any], convert: Convert = _text) -> None:
    """Attach the value of ``var`` in the running task to every stall, as ``name``.

    Args:
        name: Attribute name, e.g. ``"http.route"`` or ``"trace_id"``.
        var: The context variable to read; unset variables are left out.
        convert: Turns the value into text, on the reading thread (``str`` by
            default); returning ``None`` leaves the attribute out. Only the text is
            kept, never the value.

    Raises:
        TypeError: ``var`` is not a ``contextvars.ContextVar``.
        ValueError: ``name`` is empty or ``MAX_ATTRIBUTES`` are already registered.
    """
    if not isinstance(var, contextvars.ContextVar):
        raise TypeError(f"attribute {name!r}: expected a contextvars.ContextVar, got {var!r}")
    if not name or not isinstance(name, str):
        raise ValueError("attribute name must be a non-empty string")
    with _lock:
        if name not in _registry and len(_registry) >= MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES} attributes can be registered")
        _registry[name] = (var, convert)


def unattribute(name: str) -> None:
    """Stop attaching the attribute ``name`` (no-op if unknown)."""
    with _lock:
        _registry.pop(name, None)


def _running_handle_context(thread_id: int) -> contextvars.Context | None:
    # Before 3.12 a C task does not expose its context; the Handle running its step
    # does. Find it in the loop thread's stack and let go of the frame at once.
    frames = sys._current_frames()
    frame = frames.get(thread_id)
    del frames
    try:
        while frame is not None:
            if frame.f_code is _HANDLE_RUN_CODE:
                handle = frame.f_locals.get("self")
                return getattr(handle, "_context", None)
            frame = frame.f_back
        return None
    finally:
        del frame


_HANDLE_RUN_CODE = asyncio.events.Handle._run.__code__


def _referenced_context(task: object) -> contextvars.Context | None:
    # A C task before 3.12 keeps its context in a slot Python cannot name, but the
    # garbage collector's traversal visits it first, before the done callbacks'
    # contexts. This works on uvloop too, where no Handle frame is on the stack.
    if type(task).__module__ != "_asyncio":
        return None
    for referent in gc.get_referents(task):
        if type(referent) is contextvars.Context:
            return referent
    return None


def attributes_of(task: asyncio.Task[Any] | None, thread_id: int | None = None) -> dict[str, str]:
    """Read the registered attributes from a task's context (safe from any thread).

    Args:
        task: The task that was running, or ``None``.
        thread_id: The loop thread, to find the context where the task does not
            expose it (C tasks before Python 3.12; not possible on uvloop there).

    Returns:
        ``{"task.name": ..., name: str(value)[:MAX_VALUE_LENGTH], ...}``.
    """
    if task is None:
        return {}
    out: dict[str, str] = {}
    try:
        out["task.name"] = task.get_name()[:MAX_VALUE_LENGTH]
    except Exception:
        return out
    if not _registry:
        return out
    # Task.get_context() exists from 3.12; earlier the context is a private attribute.
    get_context = getattr(task, "get_context", None)
    if get_context is not None:
        context = get_context()
    else:
        context = getattr(task, "_context", None) or _referenced_context(task)
        if context is None and thread_id is not None:
            context = _running_handle_context(thread_id)
    if context is None:
        return out
    with _lock:
        items = list(_registry.items())
    for name, (var, convert) in items:
        try:
            if var in context:
                text = convert(context[var])
                if text is not None:
                    out[name] = text[:MAX_VALUE_LENGTH]
        except Exception:
            continue
    return out


def current_attributes() -> dict[str, str]:
    """The registered attributes in the calling thread's current context.

    For reports made on the loop thread itself, inside the task (a blocking call):
    the values are read there, like :func:`attributes_of` reads a task's.
    """
    if not _registry:
        return {}
    with _lock:
        items = list(_registry.items())
    out: dict[str, str] = {}
    for name, (var, convert) in items:
        try:
            value = var.get(_UNSET)
            if value is not _UNSET:
                text = convert(value)
                if text is not None:
                    out[name] = text[:MAX_VALUE_LENGTH]
        except Exception:
            continue
    return out


_UNSET = object()
