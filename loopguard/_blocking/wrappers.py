"""Replacement functions: what a catalogued function is swapped for while a guard runs.

:func:`replacement` is the one way a replacement function is built. It writes the
source of a small function, compiles it under a file name inside this subpackage (so
that ``frames.own_part()`` counts its frames as the guard's, and tracebacks show the
generated source) and binds it to the original and its catalogue entry. Off a loop
thread all it runs is its fast path::

    if _grl() is None and not _trio_threads:
        return _o(<the arguments as received>)

a Python call, one C call and a look at an empty dict. Only a thread that may run an
event loop goes on to the slow path, :func:`~.check._on_loop`.

How cheap that pass-through is depends on the generated function's signature, chosen
in this order:

* mirrored: the original's own signature, when it has a readable one without
  ``*args``/``**kwargs`` and with names the generated code can use. Arguments left
  out keep a private default (:data:`_MISSING_ARG`), so the common call passes on
  exactly what it received: nothing is packed into ``*args`` or ``**kwargs``.
* the generic fallback, for everything else (C functions without a signature,
  ``*args``/``**kwargs``): a fixed number of positional-only parameters when the
  original takes exactly 0 to 2 of them (:func:`_shape`, or the catalogue entry's
  ``shape`` where no signature says so), ``*args`` when it takes positional-only
  arguments only, else ``*args, **kwargs``.

Socket methods get one more test on the fast path: a non-blocking socket (all of
asyncio's own I/O, made on the loop) passes without leaving the generated frame.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from .check import _AUTO, _Entry, _grl, _on_loop
from .probes import _p_socket
from .trio_runs import _trio_threads

__all__ = ["replacement"]

_MISSING_ARG: Any = object()  # the default of every optional parameter of a mirror
_P = inspect.Parameter
# The globals of generated functions: the fast path's two names and the slow path.
_NAMESPACE: dict[str, Any] = {
    "__name__": __name__,
    "_grl": _grl,
    "_trio_threads": _trio_threads,
    "_on_loop": _on_loop,
}
_HERE = os.path.dirname(os.path.abspath(__file__))


class _Signature(NamedTuple):
    """A generated function's parameters, and the lines that hand its arguments on."""

    header: str  # between the parentheses of ``def guarded(...)``
    fast: list[str]  # pass the call to the original ``_o``
    slow: list[str]  # pass it to ``_on_loop`` with the entry ``_e``
    first: str | None  # the first argument, when there always is one


def replacement(entry: _Entry, original: Callable[..., Any]) -> Callable[..., Any]:
    """Build the replacement of ``original``, reported as ``entry``.

    Args:
        entry: The catalogue name, probe and (for C functions) shape of the call.
        original: The function or method replaced.

    Returns:
        A plain function that looks like ``original`` (``functools.update_wrapper``).
    """
    params = _parameters(original)
    signature = None if params is None else _mirrored(params)
    guarded = None if signature is None else _generate(entry, original, signature)
    if guarded is None:
        # The generic fallback: no signature to mirror, or one the generated code
        # cannot use.
        shape = _shape(params) if entry.shape == _AUTO else entry.shape
        if entry.probe is _p_socket and shape != -1:
            shape = None  # the socket test reads the first argument, when there is one
        guarded = _generate(entry, original, _generic(shape))
        assert guarded is not None  # its names are our own
    functools.update_wrapper(guarded, original, updated=())
    return guarded


def _parameters(original: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """The parameters of ``original``, or ``None`` when it has no signature to read."""
    try:
        return list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None


def _shape(params: list[inspect.Parameter] | None) -> int | None:
    """How many arguments a function takes if always exactly that many, all positional-only.

    Returns:
        That number (0 to 2), ``-1`` when it takes positional-only arguments only but
        not a fixed number, ``None`` otherwise (or when its signature is unknown).
    """
    if params is None:
        return None
    kinds = {p.kind for p in params}
    if not kinds <= {_P.POSITIONAL_ONLY, _P.VAR_POSITIONAL}:
        return None
    if _P.VAR_POSITIONAL in kinds or any(p.default is not _P.empty for p in params):
        return -1
    return len(params) if len(params) <= 2 else -1


def _mirrored(params: list[inspect.Parameter]) -> _Signature | None:
    """The very signature of a function with ``params``, or ``None`` if it cannot be mirrored.

    Functions with ``*args``/``**kwargs``, or with a parameter name that could clash
    with the generated code's own (``_o``, ``_a``, ...) get ``None``.
    """
    if any(p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) for p in params):
        return None
    if any(not p.name.isidentifier() or p.name.startswith("_") for p in params):
        return None
    return _fixed(params)


def _generic(shape: int | None) -> _Signature:
    """The fallback signature for a function of shape ``shape`` (see :func:`_shape`)."""
    if shape is not None and shape >= 0:
        return _fixed([_P(f"a{i}", _P.POSITIONAL_ONLY) for i in range(shape)])
    if shape == -1:
        return _Signature("*_a", ["return _o(*_a)"], ["return _on_loop(_e, _o, _a, {})"], "_a[0]")
    return _Signature(
        "*_a, **_k",
        ["if _k:", "    return _o(*_a, **_k)", "return _o(*_a)"],
        ["return _on_loop(_e, _o, _a, _k)"],
        "_a[0]",
    )


def _fixed(params: list[inspect.Parameter]) -> _Signature:
    """A signature of exactly ``params`` (no ``*args``/``**kwargs``).

    Positional-only parameters are renamed ``a0``, ``a1``, ...; optional ones default
    to ``_M`` (:data:`_MISSING_ARG`) and are passed on only when given.
    """
    names = [f"a{i}" if p.kind is _P.POSITIONAL_ONLY else p.name for i, p in enumerate(params)]
    pairs = list(zip(params, names, strict=True))
    required = [(p, n) for p, n in pairs if p.default is p.empty]
    positional = [n for p, n in required if p.kind is not _P.KEYWORD_ONLY]
    keyword = [n for p, n in required if p.kind is _P.KEYWORD_ONLY]
    optional = [(p, n) for p, n in pairs if p.default is not p.empty]
    header = _header(pairs)
    first = positional[0] if positional else None
    plain = f"return _o({', '.join([*positional, *(f'{n}={n}' for n in keyword)])})"
    given_k = "{" + ", ".join(f"{n!r}: {n}" for n in keyword) + "}"
    if not optional:  # both paths pass the arguments on as written
        given_a = f"({positional[0]},)" if len(positional) == 1 else f"({', '.join(positional)})"
        return _Signature(
            header, [plain], [f"return _on_loop(_e, _o, {given_a}, {given_k})"], first
        )
    build = [f"_a = [{', '.join(positional)}]", f"_k = {given_k}"]
    for p, n in optional:
        if p.kind is _P.POSITIONAL_ONLY:
            build.append(f"if {n} is not _M: _a.append({n})")
        else:
            build.append(f"if {n} is not _M: _k[{n!r}] = {n}")
    left_out = " and ".join(f"{n} is _M" for _, n in optional)
    fast = [f"if {left_out}:", f"    {plain}", *build, "return _o(*_a, **_k)"]
    return _Signature(header, fast, [*build, "return _on_loop(_e, _o, tuple(_a), _k)"], first)


def _header(pairs: list[tuple[inspect.Parameter, str]]) -> str:
    """The parameter list of ``def guarded(...)`` for parameters and their new names."""
    parts: list[str] = []
    previous = None
    for p, name in pairs:
        if previous is _P.POSITIONAL_ONLY and p.kind is not _P.POSITIONAL_ONLY:
            parts.append("/")
        if p.kind is _P.KEYWORD_ONLY and previous is not _P.KEYWORD_ONLY:
            parts.append("*")
        parts.append(name if p.default is p.empty else f"{name}=_M")
        previous = p.kind
    if previous is _P.POSITIONAL_ONLY:
        parts.append("/")
    return ", ".join(parts)


def _generate(
    entry: _Entry, original: Callable[..., Any], signature: _Signature
) -> Callable[..., Any] | None:
    """Compile the replacement with ``signature``; ``None`` if Python refuses its source."""
    skip = ""
    if entry.probe is _p_socket and signature.first is not None:
        skip = f" or {signature.first}.gettimeout() == 0.0"
    lines = [
        "def _make(_o, _e, _M):",
        f"    def guarded({signature.header}):",
        f"        if (_grl() is None and not _trio_threads){skip}:",
        *(f"            {line}" for line in signature.fast),
        "        __tracebackhide__ = True",
        *(f"        {line}" for line in signature.slow),
        "    return guarded",
    ]
    source = "\n".join(lines)
    # A file name inside this subpackage: frames.own_part() counts these frames as the
    # guard's, and linecache shows the generated source in tracebacks.
    filename = os.path.join(_HERE, f"<guard of {entry.name}>")
    scope: dict[str, Any] = {}
    try:
        code = compile(source, filename, "exec")
    except SyntaxError:
        return None  # a mirrored name Python does not take (a keyword, a repeat)
    exec(code, _NAMESPACE, scope)  # the source is built above from a signature
    linecache.cache[filename] = (len(source), None, [line + "\n" for line in lines], filename)
    guarded: Callable[..., Any] = scope["_make"](original, entry, _MISSING_ARG)
    return guarded
