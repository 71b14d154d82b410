"""DB-API drivers whose connections and cursors are C types: sqlite3 and psycopg2.

Their methods cannot be patched, so one factory, :class:`DbApiDriver`, guards them
through what creates them: the driver's ``connect()`` is replaced by a function that
passes a guarded connection class as the connection factory; that class's
``cursor()`` passes a guarded cursor class as the cursor factory; the listed methods
of both are replacements (:func:`~.wrappers.replacement`). Each driver is a
declaration: where its ``connect()`` and ``cursor()`` take their factories, which
methods block, and which connection methods make their cursor in C (those are run on
a cursor of our own, so the cursor's guarded methods are the ones that run).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .check import _Entry, _grl, _internal_error, _on_loop
from .ctypes_guards import _guarded_subclass
from .trio_runs import _trio_threads
from .wrappers import replacement

__all__ = ["PSYCOPG2", "SQLITE3", "DbApiDriver"]


class _Slot(NamedTuple):
    """Where a call takes a factory class: its keyword, and its position if it has one."""

    keyword: str
    position: int | None = None

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        return kwargs.get(self.keyword)

    def put(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        i = self.position
        if i is not None and len(args) > i:
            return (*args[:i], value, *args[i + 1 :]), kwargs
        return args, {**kwargs, self.keyword: value}


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DbApiDriver:
    """A DB-API driver guarded through ``connect()``: connection, then cursor classes.

    Attributes:
        module: The driver's module (patched; the first part of the catalogue names).
        connection_type: Dotted path of its connection class.
        cursor_type: Dotted path of its cursor class.
        connection_methods: Connection methods that block.
        cursor_methods: Cursor methods that block (those a cursor class has).
        connection_factory: Where ``connect()`` takes the connection class.
        cursor_factory: Where ``connection.cursor()`` takes the cursor class.
        through_cursor: Connection methods run on a new cursor of the connection: in C
            they make their cursor themselves.
        default_cursor: The connection attribute that holds its default cursor class,
            if it has one.
    """

    module: str
    connection_type: str
    cursor_type: str
    connection_methods: tuple[str, ...]
    cursor_methods: tuple[str, ...]
    connection_factory: _Slot
    cursor_factory: _Slot
    through_cursor: tuple[str, ...] = ()
    default_cursor: str | None = None

    @property
    def connection_name(self) -> str:
        """The connection class's name in catalogue names (``"Connection"``)."""
        return self.connection_type.rpartition(".")[2]

    @property
    def cursor_name(self) -> str:
        """The cursor class's name in catalogue names (``"Cursor"``)."""
        return self.cursor_type.rpartition(".")[2]

    def make_connect(self, original: Any) -> Any:
        """The replacement of the driver's ``connect``: it passes a guarded connection class."""
        entry = _Entry(f"{self.module}.connect", None)
        slot = self.connection_factory

        def connect(*args: Any, **kwargs: Any) -> Any:
            try:
                factory = slot.get(args, kwargs) or _resolve(self.connection_type)
                args, kwargs = slot.put(args, kwargs, self._connection_class(factory))
            except Exception:
                _internal_error()
            if _grl() is None and not _trio_threads:
                return original(*args, **kwargs)
            __tracebackhide__ = True
            return _on_loop(entry, original, args, kwargs)

        functools.update_wrapper(connect, original, updated=())
        return connect

    def _connection_class(self, base: type) -> type:
        return _guarded_subclass(base, self._connection_methods)

    def _cursor_class(self, base: type) -> type:
        return _guarded_subclass(base, self._cursor_methods)

    def _connection_methods(self, base: type) -> dict[str, Any]:
        plain_cursor = base.cursor  # type: ignore[attr-defined]
        slot = self.cursor_factory
        cursor_type = _resolve(self.cursor_type)
        attribute = self.default_cursor

        def cursor(conn: Any, *args: Any, **kwargs: Any) -> Any:
            factory = slot.get(args, kwargs)
            if not factory and attribute is not None:
                factory = getattr(conn, attribute, None)
            factory = factory or cursor_type
            if isinstance(factory, type) and issubclass(factory, cursor_type):
                args, kwargs = slot.put(args, kwargs, self._cursor_class(factory))
            return plain_cursor(conn, *args, **kwargs)

        methods: dict[str, Any] = {}
        for name in self.connection_methods:
            if name in self.through_cursor:
                original = _via_cursor(name)
            elif hasattr(base, name):
                original = getattr(base, name)
            else:
                continue
            entry = _Entry(f"{self.module}.{self.connection_name}.{name}", None)
            methods[name] = replacement(entry, original)
        methods["cursor"] = cursor
        return methods

    def _cursor_methods(self, base: type) -> dict[str, Any]:
        return {
            name: replacement(
                _Entry(f"{self.module}.{self.cursor_name}.{name}", None), getattr(base, name)
            )
            for name in self.cursor_methods
            if hasattr(base, name)
        }


def _via_cursor(method: str) -> Callable[..., Any]:
    """``connection.<method>(...)`` as ``connection.cursor().<method>(...)``."""

    def call(self: Any, *args: Any) -> Any:
        return getattr(self.cursor(), method)(*args)

    call.__name__ = call.__qualname__ = method
    return call


SQLITE3 = DbApiDriver(
    "sqlite3",
    connection_type="sqlite3.Connection",
    cursor_type="sqlite3.Cursor",
    connection_methods=("execute", "executemany", "executescript", "commit", "rollback"),
    cursor_methods=(
        "execute",
        "executemany",
        "executescript",
        "fetchone",
        "fetchmany",
        "fetchall",
    ),
    connection_factory=_Slot("factory", 5),
    cursor_factory=_Slot("factory", 0),
    through_cursor=("execute", "executemany", "executescript"),
)

PSYCOPG2 = DbApiDriver(
    "psycopg2",
    connection_type="psycopg2.extensions.connection",
    cursor_type="psycopg2.extensions.cursor",
    connection_methods=("commit", "rollback"),
    cursor_methods=(
        "execute",
        "executemany",
        "callproc",
        "fetchone",
        "fetchmany",
        "fetchall",
        "copy_from",
        "copy_to",
        "copy_expert",
    ),
    connection_factory=_Slot("connection_factory"),
    cursor_factory=_Slot("cursor_factory", 1),
    default_cursor="cursor_factory",
)
