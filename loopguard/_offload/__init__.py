"""The offload subsystem: moving blocking work off the event loop.

* :func:`offload` turns a synchronous function into an async one whose body runs in a
  worker thread (its own on asyncio and uvloop, trio's on trio), a worker
  process (``anyio.to_process``) or any ``concurrent.futures.Executor`` — dask's
  ``Client.get_executor()`` included, which is how offloaded work leaves the machine.
  With ``adaptive=`` it runs the function inline while it is fast and moves it to the
  worker once a call is seen to exceed a budget (an :class:`~loopguard.events.Offloaded`
  event and a log line say so).
* :func:`yielding` wraps a long iteration so that it hands control back to the loop
  whenever its time budget is spent; :func:`checkpoint` hands it back once.
* :func:`set_offload_limit` sizes a limit shared by name between functions.

Offloaded calls report ``loopguard.offload.*`` metrics through :mod:`loopguard.metrics`.
Nothing here runs at import time, and nothing is patched.

The modules, each importing only those listed after it:

* ``decorator``: :func:`offload`, its options and the wrapper it builds;
* ``adaptive``: the inline fast path and the one-time switch to a worker;
* ``runners``: how one call runs per mode (thread, process, executor);
* ``pool``: the worker threads of each asyncio loop, and the hop to trio's;
* ``remote``: what crosses the process boundary to a worker and back;
* ``track``: one call's limit slot, timing and races, and the active-call count;
* ``waiting``: waiting for work elsewhere without blocking the loop, through cancellation;
* ``limits``: per-function and shared limits, per event loop;
* ``yielding``: :func:`yielding` and :func:`checkpoint`;
* ``common``: the default budget, the modes, the wrapper marker, naming.
"""

from .common import DEFAULT_BUDGET
from .decorator import offload
from .limits import set_offload_limit
from .yielding import checkpoint, yielding

__all__ = ["DEFAULT_BUDGET", "checkpoint", "offload", "set_offload_limit", "yielding"]
