"""Start-up hook for ``loopguard run``: installs the watchdog from ``LOOPGUARD_*``.

``loopguard run`` puts this directory first on ``PYTHONPATH``, so every Python
process the command starts imports this module at interpreter start. It installs
loopguard, then hands over to any other ``sitecustomize`` the environment has, so
the user's own start-up hook still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _boot() -> None:
    try:
        from loopguard._boot import boot
    except ImportError as exc:
        sys.stderr.write(
            f"loopguard: not importable by {sys.executable} ({exc}); running without it\n"
        )
        return
    if boot() is not None and (
        os.environ.get("LOOPGUARD_OTEL") or os.environ.get("LOOPGUARD_PROMETHEUS")
    ):
        from loopguard.otel import configure_from_cli

        configure_from_cli()


def _chain() -> None:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_boot()
_chain()
