"""Reversible, idempotent patches and removable post-import hooks.

A :class:`Patch` replaces one attribute of a class or module with a wrapt
``FunctionWrapper``. ``activate``/``deactivate`` may be called any number of times.
On ``deactivate`` the original is put back only if the attribute is still our own
wrapper; if someone wrapped it after us, our wrapper stays in their chain but turns
into a pass-through, so neither their patch nor ours breaks.

:func:`when_imported` runs a callback once a module is imported (at once if it
already is). Unlike a process-wide import hook that can never be taken back, the
finder it installs is removed from ``sys.meta_path`` when the last hook is dropped.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import wrapt

__all__ = ["Patch", "ReplacePatch", "cancel_import_hook", "when_imported"]

logger = logging.getLogger("loopguard")

Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]

_MISSING = object()


class ReplacePatch:
    """Replace ``owner.name`` with a callable built from the original, reversibly.

    The replacement is whatever ``make(original)`` returns (for the hottest
    functions a small Python function: one frame per call, no proxy). It decides
    itself what to do once the patch is inactive (read :attr:`active`).
    :meth:`deactivate` restores the original only if the attribute is still the
    replacement; if someone replaced it after us, ours stays in their chain.

    Args:
        owner: The class or module that holds the attribute.
        name: Attribute name.
        make: Called with the original at activation; returns the replacement.
    """

    def __init__(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self.owner = owner
        self.name = name
        self._make = make
        self._own: object = _MISSING  # what owner.__dict__ held before (or _MISSING)
        self._installed: Any = None
        self.original: Any = None
        self.active = False

    def activate(self) -> None:
        """Install the replacement (no-op if already active)."""
        if self.active:
            return
        if self._installed is not None and vars(self.owner).get(self.name) is self._installed:
            self.active = True  # an earlier deactivate could not remove us: re-enable
            return
        own = vars(self.owner).get(self.name, _MISSING)
        original = getattr(self.owner, self.name)
        replacement = self._make(original)
        setattr(self.owner, self.name, replacement)
        self._own, self.original, self._installed = own, original, replacement
        self.active = True

    def deactivate(self) -> None:
        """Restore the original if the attribute is still ours; else become a pass-through."""
        if not self.active:
            return
        self.active = False
        if vars(self.owner).get(self.name) is not self._installed:
            logger.debug(
                "%s.%s was replaced again after loopguard; leaving a pass-through",
                getattr(self.owner, "__name__", self.owner),
                self.name,
            )
            return
        if self._own is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self._own)
        self._installed = None


class Patch(ReplacePatch):
    """Replace ``owner.name`` with a wrapt ``FunctionWrapper``, reversibly.

    Args:
        owner: The class or module that holds the attribute.
        name: Attribute name.
        wrapper: A wrapt-style wrapper ``(wrapped, instance, args, kwargs) -> result``;
            once the patch is inactive, calls go straight to the original.
    """

    def __init__(self, owner: Any, name: str, wrapper: Wrapper) -> None:
        super().__init__(owner, name, lambda original: wrapt.FunctionWrapper(original, self._call))
        self._wrapper_fn = wrapper

    def _call(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not self.active:
            return wrapped(*args, **kwargs)
        return self._wrapper_fn(wrapped, instance, args, kwargs)


# -- post-import hooks ---------------------------------------------------------------

Hook = Callable[[ModuleType], None]
_hooks: dict[str, list[Hook]] = {}
_lock = threading.RLock()
_busy = threading.local()


class _HookLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, fullname: str) -> None:
        self._loader = loader
        self._fullname = fullname

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run_hooks(self._fullname, module)


class _HookFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _hooks or getattr(_busy, "name", None) == fullname:
            return None
        _busy.name = fullname
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            _busy.name = None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookLoader(spec.loader, fullname)
        return spec


_finder = _HookFinder()


def _run_hooks(name: str, module: ModuleType) -> None:
    with _lock:
        hooks = list(_hooks.get(name, ()))
    for hook in hooks:
        try:
            hook(module)
        except Exception:
            logger.exception("loopguard hook for %s failed", name)


def when_imported(name: str, hook: Hook) -> None:
    """Call ``hook(module)`` once ``name`` is imported: now if it already is.

    Args:
        name: Fully qualified module name.
        hook: Called with the module; exceptions are logged, never raised.
    """
    with _lock:
        _hooks.setdefault(name, []).append(hook)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    module = sys.modules.get(name)
    if module is not None:
        try:
            hook(module)
        except Exception:
            logger.exception("loopguard hook for %s failed", name)


def cancel_import_hook(name: str, hook: Hook) -> None:
    """Forget a hook registered with :func:`when_imported` (no-op if unknown)."""
    with _lock:
        hooks = _hooks.get(name, [])
        if hook in hooks:
            hooks.remove(hook)
        if not hooks:
            _hooks.pop(name, None)
        if not _hooks and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
