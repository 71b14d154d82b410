"""Guarded objects for C types: locks, ``select.poll`` objects, guarded subclasses.

Methods of C types cannot be patched (not without ``forbiddenfruit``), so the guard
reaches them through what creates them: while a guard runs ``threading.Lock()`` and
``threading.RLock()`` return :class:`GuardedLock` and :class:`GuardedRLock`, and
``select.poll()`` a :class:`_GuardedPoll`. Their methods carry the same fast path as
the generated replacements. :func:`_guarded_subclass` builds (once per base class) a
subclass of a C type whose listed methods are replacements; the DB-API driver guards
use it for connections and cursors. Objects made while a guard ran stay usable after
it stopped, as pass-throughs.
"""

from __future__ import annotations

import _thread
import functools
import weakref
from collections.abc import Callable
from typing import Any

from .check import _Entry, _grl, _on_loop
from .probes import _p_lock, _p_poll
from .trio_runs import _trio_threads

_LOCK = _Entry("threading.Lock.acquire", _p_lock)
_RLOCK = _Entry("threading.RLock.acquire", _p_lock)
_POLL = _Entry("select.poll.poll", _p_poll)
_allocate_lock = _thread.allocate_lock
_RealLock = _thread.LockType
_rlock_acquire = _thread.RLock.acquire


class _LockMeta(type):
    # threading.Lock is the lock type itself on Python 3.13+: keep isinstance() working.
    def __instancecheck__(cls, obj: object) -> bool:
        return type(obj) is _RealLock or type.__instancecheck__(cls, obj)


class GuardedLock(metaclass=_LockMeta):
    """What ``threading.Lock()`` returns while a guard runs: a lock whose waits are checked."""

    __slots__ = ("__weakref__", "_acquire", "_lock", "locked", "release")

    def __init__(self) -> None:
        lock = _allocate_lock()
        self._lock = lock
        self._acquire = lock.acquire
        self.release = lock.release
        self.locked = lock.locked

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock, like ``threading.Lock.acquire``."""
        if _grl() is None and not _trio_threads:
            return self._acquire(blocking, timeout)
        __tracebackhide__ = True
        return bool(_on_loop(_LOCK, self._acquire, (blocking, timeout), {}))

    def __enter__(self) -> bool:
        if _grl() is None and not _trio_threads:
            return self._acquire()
        __tracebackhide__ = True
        return bool(_on_loop(_LOCK, self._acquire, (), {}))

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.release()

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return "<guarded " + repr(self._lock)[1:]


class GuardedRLock(_thread.RLock):  # type: ignore[misc]
    """What ``threading.RLock()`` returns while a guard runs."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock, like ``threading.RLock.acquire``."""
        if _grl() is None and not _trio_threads:
            return _rlock_acquire(self, blocking, timeout)
        __tracebackhide__ = True
        return bool(_on_loop(_RLOCK, _rlock_acquire.__get__(self), (blocking, timeout), {}))

    __enter__ = acquire  # the same call: ``with`` passes no arguments


def _make_rlock(original: Any) -> Any:
    def RLock(*args: Any, **kwargs: Any) -> Any:
        return GuardedRLock(*args, **kwargs)

    functools.update_wrapper(RLock, original, updated=())
    return RLock


class _GuardedPoll:
    __slots__ = ("_poll", "modify", "register", "unregister")

    def __init__(self, poll: Any) -> None:
        self._poll = poll
        self.register = poll.register
        self.modify = poll.modify
        self.unregister = poll.unregister

    def poll(self, *args: Any) -> Any:
        if _grl() is None and not _trio_threads:
            return self._poll.poll(*args)
        __tracebackhide__ = True
        return _on_loop(_POLL, self._poll.poll, args, {})


def _make_poll(original: Any) -> Any:
    def poll() -> Any:
        return _GuardedPoll(original())

    functools.update_wrapper(poll, original, updated=())
    return poll


_subclass_cache: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _guarded_subclass(base: type, methods: Callable[[type], dict[str, Any]]) -> type:
    """The subclass of the C type ``base`` holding ``methods(base)``, built once per base.

    ``base`` itself when it is such a subclass already. The subclass is named
    ``Guarded`` + the base's name and marked with ``_loopguard_guarded``.
    """
    if getattr(base, "_loopguard_guarded", False):
        return base
    cls = _subclass_cache.get(base)
    if cls is None:
        namespace: dict[str, Any] = {"__module__": __name__, "_loopguard_guarded": True}
        namespace.update(methods(base))
        cls = type(f"Guarded{base.__name__.capitalize()}", (base,), namespace)
        _subclass_cache[base] = cls
    return cls
