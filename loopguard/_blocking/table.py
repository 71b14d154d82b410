"""The catalogue: every call the guard knows blocks, and patching it in and out.

Owns :class:`CatalogueEntry` and the table itself, built by :func:`_add` in catalogue
order: for each entry the module and attribute that are replaced, its probe (when it
counts as blocking) and what builds its replacement (:func:`~.wrappers.replacement`
unless the entry says otherwise: guarded C objects, DB-API drivers). Entries marked
``via`` are reached through another entry's objects and patch nothing themselves.

Patching: while at least one guard runs, each module of the table is patched when it
is imported (or at once, if it is), through removable post-import hooks; stopping the
last guard cancels the hooks and puts every original back.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from .._core.patch import ReplacePatch, cancel_import_hook, when_imported
from .check import _AUTO, Probe, _Entry, _running
from .ctypes_guards import GuardedLock, _make_poll, _make_rlock
from .drivers import PSYCOPG2, SQLITE3, DbApiDriver
from .probes import (
    _p_barrier_wait,
    _p_condition_enter,
    _p_event_wait,
    _p_fd,
    _p_future,
    _p_join,
    _p_open,
    _p_popen_wait,
    _p_queue_get,
    _p_queue_put,
    _p_select,
    _p_semaphore,
    _p_sendfile,
    _p_sleep,
    _p_socket,
    _p_timeout,
    _p_waitpid,
)
from .trio_runs import TRIO_TARGETS
from .wrappers import replacement

__all__ = ["CatalogueEntry", "catalogue"]

logger = logging.getLogger("loopguard")


@dataclass(frozen=True)
class CatalogueEntry:
    """One call the guard knows blocks.

    Attributes:
        name: The name reported in :attr:`BlockingCall.function`.
        module: The module that must be imported for the entry to apply.
        target: The attribute that is patched, relative to ``module``.
        when: When the call counts as blocking (empty: always, on a loop thread).
        group: Catalogue section (``"time"``, ``"socket"``, ``"threading"``, ...).
    """

    name: str
    module: str
    target: str
    when: str
    group: str


class _Target(NamedTuple):
    entry: CatalogueEntry
    make: Callable[[Any], Any] | None  # None: reached through another target's objects


_TARGETS: list[_Target] = []


def _add(
    group: str,
    module: str,
    target: str,
    probe: Probe | None = None,
    when: str = "",
    *,
    name: str | None = None,
    make: Callable[[Any], Any] | None = None,
    via: bool = False,
    shape: int | None = _AUTO,
) -> None:
    """Catalogue ``module.target`` (reported as ``name``) in ``group``.

    ``probe`` tells whether a call blocks (``when`` says it in words); ``make`` builds
    the replacement from the original (default: :func:`~.wrappers.replacement`, with
    ``shape`` for C functions without a signature); ``via`` entries patch nothing.
    """
    full = name or f"{module}.{target}"
    entry = CatalogueEntry(full, module, target, when, group)
    if via:
        _TARGETS.append(_Target(entry, None))
        return
    maker = make if make is not None else functools.partial(replacement, _Entry(full, probe, shape))
    _TARGETS.append(_Target(entry, maker))


def _add_driver(group: str, driver: DbApiDriver) -> None:
    """Catalogue a driver: its ``connect`` is patched, its methods reached through it."""
    module = driver.module
    _add(group, module, "connect", make=driver.make_connect)
    for cls, methods in (
        (driver.connection_name, driver.connection_methods),
        (driver.cursor_name, driver.cursor_methods),
    ):
        for m in methods:
            _add(group, module, f"{cls}.{m}", via=True, when="connections from connect()")


_NONBLOCKING = "the socket is in blocking mode (a timeout counts as blocking)"
# C socket methods that take positional arguments only (no signature to read).
_SOCKET_SHAPES = dict.fromkeys(
    (
        "connect",
        "connect_ex",
        "recv",
        "recvfrom",
        "recvmsg",
        "send",
        "sendall",
        "sendto",
        "sendmsg",
    ),
    -1,
)

_add("time", "time", "sleep", _p_sleep, "seconds > 0", shape=1)
_add("builtins", "builtins", "input")
_add("builtins", "builtins", "open", _p_open, "a path, not an existing file descriptor")
_add("builtins", "io", "open", _p_open, "a path, not an existing file descriptor")

for _m in (
    "connect",
    "connect_ex",
    "accept",
    "recv",
    "recv_into",
    "recvfrom",
    "recvfrom_into",
    "recvmsg",
    "recvmsg_into",
    "send",
    "sendall",
    "sendto",
    "sendmsg",
    "sendfile",
):
    _add("socket", "socket", f"socket.{_m}", _p_socket, _NONBLOCKING, shape=_SOCKET_SHAPES.get(_m))
for _m in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
    _add("socket", "socket", _m)
_add("socket", "socket", "getfqdn")
_add("socket", "socket", "create_connection")

for _m in ("do_handshake", "connect", "read", "write", "recv", "recv_into", "send", "sendall"):
    _add("ssl", "ssl", f"SSLSocket.{_m}", _p_socket, _NONBLOCKING)

_add("os", "os", "open")
_add("os", "os", "read", _p_fd, "the file descriptor is in blocking mode")
_add("os", "os", "write", _p_fd, "the file descriptor is in blocking mode")
_add("os", "os", "sendfile", _p_sendfile, "the output descriptor is in blocking mode")
for _m in (
    "stat",
    "lstat",
    "listdir",
    "scandir",
    "access",
    "statvfs",
    "getcwd",
    "readlink",
    "mkdir",
    "makedirs",
    "rmdir",
    "remove",
    "unlink",
    "rename",
    "replace",
    "link",
    "symlink",
    "fsync",
    "system",
):
    _add("os", "os", _m)
_add("os", "os", "waitpid", _p_waitpid, "without os.WNOHANG")

for _m in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    _add("subprocess", "subprocess", _m)
_add("subprocess", "subprocess", "Popen.wait", _p_popen_wait, "the process is still running")
_add("subprocess", "subprocess", "Popen.communicate")

_add(
    "threading",
    "threading",
    "Lock",
    name="threading.Lock.acquire",
    make=lambda original: GuardedLock,
    when="the lock is held by another thread (locks made by threading.Lock())",
)
_add(
    "threading",
    "threading",
    "RLock",
    name="threading.RLock.acquire",
    make=_make_rlock,
    when="the lock is held by another thread (locks made by threading.RLock())",
)
_add(
    "threading",
    "threading",
    "Condition.__enter__",
    _p_condition_enter,
    "the condition's lock is held by another thread",
)
_add("threading", "threading", "Condition.wait", _p_timeout(1), "timeout is not 0")
_add("threading", "threading", "Event.wait", _p_event_wait, "the event is not set")
_add("threading", "threading", "Semaphore.acquire", _p_semaphore, "no slot is free")
_add("threading", "threading", "Semaphore.__enter__", _p_semaphore, "no slot is free")
_add("threading", "threading", "Barrier.wait", _p_barrier_wait, "others have yet to arrive")
_add("threading", "threading", "Thread.join", _p_join, "the thread is alive")
_add("queue", "queue", "Queue.get", _p_queue_get, "the queue is empty")
_add("queue", "queue", "Queue.put", _p_queue_put, "the queue is bounded and full")
_add(
    "concurrent.futures",
    "concurrent.futures",
    "Future.result",
    _p_future,
    "the future is not done",
)
_add(
    "concurrent.futures",
    "concurrent.futures",
    "Future.exception",
    _p_future,
    "the future is not done",
)

_add("select", "select", "select", _p_select, "timeout is not 0")
_add(
    "select",
    "select",
    "poll",
    name="select.poll.poll",
    make=_make_poll,
    when="timeout is not 0 (poll objects made by select.poll())",
)

_add_driver("sqlite3", SQLITE3)

for _m in ("connect", "request", "getresponse"):
    _add("http", "http.client", f"HTTPConnection.{_m}")
_add("http", "http.client", "HTTPResponse.read")
_add("http", "urllib.request", "urlopen")
_add("http", "urllib.request", "urlretrieve")
_add("http", "urllib.request", "OpenerDirector.open")

# Third-party sync clients, patched when (and if) they are imported.
_add("clients", "requests.sessions", "Session.request", name="requests.Session.request")
_add(
    "clients",
    "urllib3.connectionpool",
    "HTTPConnectionPool.urlopen",
    name="urllib3.HTTPConnectionPool.urlopen",
)
_add("clients", "urllib3.poolmanager", "PoolManager.urlopen", name="urllib3.PoolManager.urlopen")
_add("clients", "httpx", "Client.send")
_add("clients", "redis.client", "Redis.execute_command", name="redis.Redis.execute_command")
_add("clients", "redis.client", "Pipeline.execute", name="redis.Pipeline.execute")
_add_driver("clients", PSYCOPG2)


def catalogue() -> tuple[CatalogueEntry, ...]:
    """Every call the guard checks, in catalogue order."""
    return tuple(t.entry for t in _TARGETS)


# -- activation -------------------------------------------------------------------------

_patches: dict[str, list[ReplacePatch]] = {}
_hooks: list[tuple[str, Callable[[ModuleType], None]]] = []


def _by_module() -> dict[str, list[tuple[str, Callable[[Any], Any]]]]:
    out: dict[str, list[tuple[str, Callable[[Any], Any]]]] = collections.defaultdict(list)
    for target in _TARGETS:
        if target.make is not None:
            out[target.entry.module].append((target.entry.target, target.make))
    out["trio"].extend(TRIO_TARGETS)  # not catalogue entries: they track trio runs
    return dict(out)


def _patch_module(name: str, targets: list[tuple[str, Callable[[Any], Any]]], module: Any) -> None:
    with _running.lock:
        if not _running.guards or name in _patches:
            return
        done: list[ReplacePatch] = []
        _patches[name] = done
        for path, make in targets:
            owner_path, _, attr = path.rpartition(".")
            owner = module
            try:
                for part in filter(None, owner_path.split(".")):
                    owner = getattr(owner, part)
                if not hasattr(owner, attr):
                    continue  # not on this platform or version
                patch = ReplacePatch(owner, attr, make)
                patch.activate()
            except Exception:
                logger.warning("loopguard could not guard %s.%s", name, path, exc_info=True)
                continue
            done.append(patch)


def _hooks_on() -> None:
    for name, targets in _by_module().items():
        hook = functools.partial(_patch_module, name, targets)
        _hooks.append((name, hook))
        when_imported(name, hook)


def _hooks_off() -> None:
    for name, hook in reversed(_hooks):
        cancel_import_hook(name, hook)
    _hooks.clear()
    for patches in reversed(list(_patches.values())):
        for patch in reversed(patches):
            patch.deactivate()
    _patches.clear()
