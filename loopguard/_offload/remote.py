"""Sending a call to a worker process or a remote executor, and its outcome back.

It owns what crosses the process boundary: how a function is named so that a worker
can find it (:func:`remote_reference`), the entry points that run in the worker
(:func:`process_entry`, :func:`executor_entry`), unpacking the outcome with the
worker's traceback attached (:func:`unpack`), and the errors that say what does not
pickle or cannot be imported.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback
import types
from collections.abc import Callable
from time import perf_counter
from typing import Any, cast

from .common import WRAPPER_ATTR
from .track import Track

__all__ = [
    "check_importable",
    "executor_entry",
    "pickling_error",
    "process_entry",
    "remote_reference",
    "unpack",
]


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process or remote executor."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class _ByReference:
    """A decorated function, sent by module and qualified name and unwrapped on arrival.

    ``pickle`` sends a function by name and checks that the name still leads to it,
    which fails for a decorated function: its name leads to the wrapper.
    """

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ByReference, (self.module, self.qualname))

    def resolve(self) -> Callable[..., Any]:
        module = sys.modules.get(self.module) or importlib.import_module(self.module)
        obj = _lookup(module, self.qualname)
        if obj is None:
            raise LookupError(f"{self.module}.{self.qualname} cannot be found in this process")
        return cast(Callable[..., Any], _unwrap(obj))


def _lookup(module: object, qualname: str) -> object:
    obj = module
    for part in qualname.split("."):
        space = getattr(obj, "__dict__", None)
        if isinstance(obj, type) and space is not None and part in space:
            obj = space[part]  # a staticmethod/classmethod object, not its binding
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unwrap(obj: object) -> object:
    while True:
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif getattr(obj, WRAPPER_ATTR, None) is not None:
            obj = getattr(obj, "__wrapped__", obj)
        else:
            return obj


def check_importable(func: object, name: str) -> None:
    """Raise ``TypeError`` if a worker process could not find ``func`` by its name."""
    qualname = getattr(func, "__qualname__", "")
    if isinstance(func, types.FunctionType) and ("<locals>" in qualname or "<lambda>" in qualname):
        raise TypeError(
            f"offload(process=True) cannot run {name} in a worker process: a worker "
            "finds a function by module and name, and this one is local (defined "
            "inside a function, or a lambda). Define it at the top level of a module."
        )


def remote_reference(func: Callable[..., Any], *, main_by_value: bool) -> object:
    """What to send a worker so that it can call ``func``."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(func, types.FunctionType) or not module or not qualname:
        return func  # a bound method, a partial, a callable object: pickle decides
    if module == "__main__" and main_by_value:
        return func  # cloudpickle-style executors send __main__ functions by value
    found = sys.modules.get(module)
    obj = _lookup(found, qualname) if found is not None else None
    if obj is func:
        return func
    if obj is not None and _unwrap(obj) is func:
        return _ByReference(module, qualname)
    return func


def _call_remote(
    target: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any, str, float]:
    """Call in a worker; return ``(ok, result or exception, traceback text, run time)``."""
    start = perf_counter()
    try:
        func = target.resolve() if isinstance(target, _ByReference) else target
        result = cast(Callable[..., Any], func)(*args, **kwargs)
    except Exception as exc:
        return False, exc, _format(exc), perf_counter() - start
    return True, result, "", perf_counter() - start


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def process_entry(payload: bytes) -> bytes:
    """Run a pickled call in an anyio worker process; return its pickled outcome."""
    # The reply is pickled here, not by anyio, so a result that does not pickle
    # becomes a clear error instead of a broken worker.
    try:
        target, args, kwargs = pickle.loads(payload)
        outcome = _call_remote(target, args, kwargs)
    except Exception as exc:
        outcome = (False, exc, _format(exc), 0.0)
    try:
        return pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        ok, value, text, run = outcome
        if ok:
            error: Exception = pickle.PicklingError(
                f"the result ({type(value).__qualname__}) cannot be pickled to send it "
                f"back from the worker process: {type(exc).__name__}: {exc}"
            )
        else:
            error = RuntimeError(
                f"{type(value).__qualname__}: {value} (the exception itself cannot be pickled)"
            )
        return pickle.dumps((False, error, text, run), pickle.HIGHEST_PROTOCOL)


def executor_entry(
    target: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any, str, float]:
    """Run a call wherever the executor runs it (maybe another machine); return its outcome."""
    return _call_remote(target, args, kwargs)


def unpack(outcome: tuple[bool, Any, str, float], track: Track) -> Any:
    """Return a worker's result, or raise its exception with the worker's traceback."""
    ok, value, text, run = outcome
    track.ended = perf_counter()
    track.started = track.ended - run
    if ok:
        return value
    if text:
        value.__cause__ = _RemoteTraceback(text)
    raise value


def pickling_error(
    name: str, target: object, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
) -> pickle.PicklingError:
    """Say which part of a call of ``name`` cannot be pickled to send it to a worker."""
    what = f"{name} itself"
    for label, value in [
        *((f"argument {i + 1}", a) for i, a in enumerate(args)),
        *((f"argument {k}=", v) for k, v in kwargs.items()),
        ("the function", target),
    ]:
        try:
            pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            what = label if label == "the function" else f"{label} ({type(value).__qualname__})"
            break
    return pickle.PicklingError(
        f"cannot send a call of {name} to a worker process: {what} cannot be pickled "
        f"({type(exc).__name__}: {exc}). Arguments and results of process=True "
        "functions must pickle; the function must be defined at the top level of a module."
    )
