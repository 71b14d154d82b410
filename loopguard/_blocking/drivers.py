"""DB-API drivers whose connections and cursors are C types: sqlite3 and psycopg2.

Their methods cannot be patched, so each driver is guarded through what creates them:
the replacement of its ``connect()`` passes a guarded connection class as the
connection factory, whose ``cursor()`` passes a guarded cursor class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .check import _Entry, _grl, _internal_error, _on_loop
from .ctypes_guards import _cached_subclass, _subclass_with
from .trio_runs import _trio_threads

# sqlite3: connections and cursors are C types; sqlite3.connect passes a guarded factory.

_SQLITE_CONNECT = _Entry("sqlite3.connect", None)
_SQLITE_CONN_METHODS = ("execute", "executemany", "executescript", "commit", "rollback")
_SQLITE_CURSOR_METHODS = (
    "execute",
    "executemany",
    "executescript",
    "fetchone",
    "fetchmany",
    "fetchall",
)
_SQLITE_ENTRIES = {
    **{f"conn.{m}": _Entry(f"sqlite3.Connection.{m}", None) for m in _SQLITE_CONN_METHODS},
    **{f"cur.{m}": _Entry(f"sqlite3.Cursor.{m}", None) for m in _SQLITE_CURSOR_METHODS},
}


def _sqlite_cursor_class(base: type) -> type:
    return _cached_subclass(
        base,
        lambda b: _subclass_with(
            b, {m: (_SQLITE_ENTRIES[f"cur.{m}"], getattr(b, m)) for m in _SQLITE_CURSOR_METHODS}, {}
        ),
    )


def _sqlite_connection_class(base: type) -> type:
    import sqlite3

    plain_cursor = base.cursor  # type: ignore[attr-defined]

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        factory = args[0] if args else kwargs.pop("factory", None)
        factory = sqlite3.Cursor if factory is None else factory
        if isinstance(factory, type) and issubclass(factory, sqlite3.Cursor):
            factory = _sqlite_cursor_class(factory)
        return plain_cursor(self, factory, **kwargs)

    def via_cursor(method: str) -> Callable[..., Any]:
        def call(self: Any, *args: Any) -> Any:
            return getattr(self.cursor(), method)(*args)

        call.__name__ = call.__qualname__ = method
        return call

    def build(b: type) -> type:
        methods: dict[str, tuple[_Entry, Callable[..., Any]]] = {}
        for m in _SQLITE_CONN_METHODS:
            original = via_cursor(m) if m.startswith("execute") else getattr(b, m)
            methods[m] = (_SQLITE_ENTRIES[f"conn.{m}"], original)
        return _subclass_with(b, methods, {"cursor": cursor})

    return _cached_subclass(base, build)


def _make_sqlite_connect(original: Any) -> Any:
    import sqlite3

    def connect(*args: Any, **kwargs: Any) -> Any:
        try:
            if len(args) > 5:
                args = (*args[:5], _sqlite_connection_class(args[5]), *args[6:])
            else:
                kwargs["factory"] = _sqlite_connection_class(
                    kwargs.get("factory") or sqlite3.Connection
                )
        except Exception:
            _internal_error()
        if _grl() is None and not _trio_threads:
            return original(*args, **kwargs)
        __tracebackhide__ = True
        return _on_loop(_SQLITE_CONNECT, original, args, kwargs)

    functools.update_wrapper(connect, original, updated=())
    return connect


# psycopg2: the same arrangement through connection_factory / cursor_factory.

_PG_CONNECT = _Entry("psycopg2.connect", None)
_PG_CONN_METHODS = ("commit", "rollback")
_PG_CURSOR_METHODS = (
    "execute",
    "executemany",
    "callproc",
    "fetchone",
    "fetchmany",
    "fetchall",
    "copy_from",
    "copy_to",
    "copy_expert",
)
_PG_ENTRIES = {
    **{f"conn.{m}": _Entry(f"psycopg2.connection.{m}", None) for m in _PG_CONN_METHODS},
    **{f"cur.{m}": _Entry(f"psycopg2.cursor.{m}", None) for m in _PG_CURSOR_METHODS},
}


def _pg_cursor_class(base: type) -> type:
    return _cached_subclass(
        base,
        lambda b: _subclass_with(
            b,
            {
                m: (_PG_ENTRIES[f"cur.{m}"], getattr(b, m))
                for m in _PG_CURSOR_METHODS
                if hasattr(b, m)
            },
            {},
        ),
    )


def _pg_connection_class(base: type, default_cursor: type) -> type:
    plain_cursor = base.cursor  # type: ignore[attr-defined]

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1:
            args = (args[0], _pg_cursor_class(args[1] or default_cursor), *args[2:])
        else:
            factory = kwargs.get("cursor_factory") or self.cursor_factory or default_cursor
            kwargs["cursor_factory"] = _pg_cursor_class(factory)
        return plain_cursor(self, *args, **kwargs)

    def build(b: type) -> type:
        return _subclass_with(
            b,
            {m: (_PG_ENTRIES[f"conn.{m}"], getattr(b, m)) for m in _PG_CONN_METHODS},
            {"cursor": cursor},
        )

    return _cached_subclass(base, build)


def _make_pg_connect(original: Any) -> Any:
    def connect(*args: Any, **kwargs: Any) -> Any:
        try:
            import psycopg2.extensions

            kwargs["connection_factory"] = _pg_connection_class(
                kwargs.get("connection_factory") or psycopg2.extensions.connection,
                psycopg2.extensions.cursor,
            )
        except Exception:
            _internal_error()
        if _grl() is None and not _trio_threads:
            return original(*args, **kwargs)
        __tracebackhide__ = True
        return _on_loop(_PG_CONNECT, original, args, kwargs)

    functools.update_wrapper(connect, original, updated=())
    return connect
