"""Replacement functions: what a catalogued function is swapped for while a guard runs.

Off a loop thread a replacement only asks ``asyncio._get_running_loop()`` and whether
any trio run is in progress, then calls the original; a thread that may run an event
loop goes on to the slow path, :func:`~.check._on_loop`. :func:`_guarded` builds the
replacement: a function compiled from source with the original's very signature
(:func:`_mirror`) when it has a readable one, else a Python closure of the shape the
original takes (:func:`_shape`), so that as little as possible is packed into
``*args``/``**kwargs`` on the fast path.
"""

from __future__ import annotations

import functools
import linecache
import os
from collections.abc import Callable
from typing import Any

from .check import _AUTO, _Entry, _grl, _on_loop
from .probes import _p_socket
from .trio_runs import _trio_threads


def _shape(original: Callable[..., Any]) -> int | None:
    """How many arguments ``original`` takes if always exactly that many, all positional-only.

    Returns:
        That number (0 to 2), ``-1`` when it takes positional-only arguments only but
        not a fixed number, ``None`` otherwise (or when its signature is unknown).
    """
    import inspect

    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in params}
    if not kinds <= {inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL}:
        return None
    if inspect.Parameter.VAR_POSITIONAL in kinds or any(
        p.default is not inspect.Parameter.empty for p in params
    ):
        return -1
    return len(params) if len(params) <= 2 else -1


_MISSING_ARG: Any = object()


def _mirror(entry: _Entry, original: Callable[..., Any]) -> Callable[..., Any] | None:
    """A replacement with the very signature of ``original``, when it has a readable one.

    Arguments left out keep a private default, so the common call (required arguments
    only) is passed on as is: nothing is packed into ``*args`` or ``**kwargs``.
    Functions with ``*args``/``**kwargs`` or without a signature get ``None``.
    """
    import inspect

    kind = inspect.Parameter
    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD) for p in params):
        return None
    if any(not p.name.isidentifier() or p.name.startswith("_") for p in params):
        return None
    names = [f"a{i}" if p.kind is kind.POSITIONAL_ONLY else p.name for i, p in enumerate(params)]
    header: list[str] = []
    for i, (p, name) in enumerate(zip(params, names, strict=True)):
        previous = params[i - 1].kind if i else None
        if previous is kind.POSITIONAL_ONLY and p.kind is not kind.POSITIONAL_ONLY:
            header.append("/")
        if p.kind is kind.KEYWORD_ONLY and previous is not kind.KEYWORD_ONLY:
            header.append("*")
        header.append(name if p.default is p.empty else f"{name}=_M")
    if params and params[-1].kind is kind.POSITIONAL_ONLY:
        header.append("/")
    positional = [
        n
        for p, n in zip(params, names, strict=True)
        if p.default is p.empty and p.kind is not kind.KEYWORD_ONLY
    ]
    keyword = [
        n
        for p, n in zip(params, names, strict=True)
        if p.default is p.empty and p.kind is kind.KEYWORD_ONLY
    ]
    optional = [(p, n) for p, n in zip(params, names, strict=True) if p.default is not p.empty]
    build = [
        f"_a = [{', '.join(positional)}]",
        "_k = {" + ", ".join(f"{n!r}: {n}" for n in keyword) + "}",
    ]
    for p, n in optional:
        if p.kind is kind.POSITIONAL_ONLY:
            build.append(f"if {n} is not _M: _a.append({n})")
        else:
            build.append(f"if {n} is not _M: _k[{n!r}] = {n}")
    plain = ", ".join([*positional, *(f"{n}={n}" for n in keyword)])
    skip = ""
    if entry.probe is _p_socket and positional:
        skip = f" or {positional[0]}.gettimeout() == 0.0"
    body = [f"    def guarded({', '.join(header)}):"]
    body.append(f"        if (_grl() is None and not _trio_threads){skip}:")
    if optional:
        body.append(f"            if {' and '.join(f'{n} is _M' for _, n in optional)}:")
        body.append(f"                return _o({plain})")
        body.extend(f"            {line}" for line in build)
        body.append("            return _o(*_a, **_k)")
    else:
        body.append(f"            return _o({plain})")
    body.append("        __tracebackhide__ = True")
    body.extend(f"        {line}" for line in build)
    body.append("        return _on_loop(_e, _o, tuple(_a), _k)")
    body.append("    return guarded")
    source = "def _make(_o, _e, _M):\n" + "\n".join(body)
    scope: dict[str, Any] = {}
    # A file name inside this subpackage: frames.own_part() counts these frames as the
    # guard's, and linecache shows the generated source in tracebacks.
    filename = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"<guard of {entry.name}>")
    try:
        code = compile(source, filename, "exec")
        exec(code, globals(), scope)  # the source is built above from a signature
    except SyntaxError:
        return None
    lines = [line + "\n" for line in source.splitlines()]
    linecache.cache[filename] = (len(source), None, lines, filename)
    guarded: Callable[..., Any] = scope["_make"](original, entry, _MISSING_ARG)
    functools.update_wrapper(guarded, original, updated=())
    return guarded


def _guarded(entry: _Entry, original: Callable[..., Any]) -> Callable[..., Any]:
    """Return the replacement of ``original``: a plain function with a C-only fast path.

    Off the loop the replacement costs a Python call and ``_get_running_loop()``;
    packing ``*args``/``**kwargs`` is a large part of that, so functions that take a
    fixed number of positional-only arguments (most of the C ones) get a replacement
    of exactly that signature, and positional-only ones no ``**kwargs``.
    """
    on_loop = _on_loop
    grl = _grl
    mirrored = _mirror(entry, original)
    if mirrored is not None:
        return mirrored
    shape = _shape(original) if entry.shape == _AUTO else entry.shape
    guarded: Callable[..., Any]

    if entry.probe is _p_socket and shape == -1:
        # Socket methods: asyncio calls them on the loop all the time, on non-blocking
        # sockets; let those through without leaving this frame.
        def guarded(*args: Any) -> Any:
            if (grl() is None and not _trio_threads) or args[0].gettimeout() == 0.0:
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, {})

    elif entry.probe is _p_socket:

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if (grl() is None and not _trio_threads) or args[0].gettimeout() == 0.0:
                if kwargs:
                    return original(*args, **kwargs)
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, kwargs)

    elif shape == 0:

        def guarded() -> Any:
            if grl() is None and not _trio_threads:
                return original()
            __tracebackhide__ = True
            return on_loop(entry, original, (), {})

    elif shape == 1:

        def guarded(a: Any, /) -> Any:
            if grl() is None and not _trio_threads:
                return original(a)
            __tracebackhide__ = True
            return on_loop(entry, original, (a,), {})

    elif shape == 2:

        def guarded(a: Any, b: Any, /) -> Any:
            if grl() is None and not _trio_threads:
                return original(a, b)
            __tracebackhide__ = True
            return on_loop(entry, original, (a, b), {})

    elif shape == -1:

        def guarded(*args: Any) -> Any:
            if grl() is None and not _trio_threads:
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, {})

    else:

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if grl() is None and not _trio_threads:
                if kwargs:
                    return original(*args, **kwargs)
                return original(*args)
            __tracebackhide__ = True
            return on_loop(entry, original, args, kwargs)

    functools.update_wrapper(guarded, original, updated=())
    return guarded


def _replace(entry: _Entry) -> Callable[[Any], Any]:
    return lambda original: _guarded(entry, original)
