"""The blocking-call guard subsystem: the catalogue of calls that block, and the guard.

The guard replaces each catalogued function (``time.sleep``, blocking socket and file
calls, lock and queue waits, ``subprocess``, ``sqlite3``, ``http.client``, sync HTTP and
database clients, ...) with a small Python function. Off a loop thread that function
only asks ``asyncio._get_running_loop()`` (a C call) and whether any trio run is in
progress, then calls the original: a few dozen nanoseconds. On a thread that runs an
event loop it asks whether *this* call would block (a non-blocking socket, an
uncontended lock, ``sleep(0)``, a finished future do not), checks the allow rules
against the caller's stack, and then warns, records or refuses the call
(:class:`BlockingCallError`).

Patching happens only while at least one :class:`BlockingGuard` runs (``install(
blocking=...)`` starts one); modules that are not imported yet are patched when they
are, through removable post-import hooks. Stopping the last guard puts every original
back. Objects created while a guard ran (locks from ``threading.Lock()``, sqlite3 and
psycopg2 connections) stay usable afterwards and turn into plain pass-throughs.

C types cannot be patched without ``forbiddenfruit``, so methods of C objects are
reached through what creates them: ``threading.Lock``/``RLock`` and ``select.poll``
return guarded objects, ``sqlite3.connect``/``psycopg2.connect`` pass a guarded
connection factory. Objects created before the guard started are not guarded.

Modules, each importing only those above it:

* ``rules``: allow rules and the rule report.
* ``trio_runs``: which threads are inside a trio run.
* ``check``: the slow path on a loop thread, :class:`BlockingCallError`, the running
  guards.
* ``probes``: whether a particular call blocks.
* ``wrappers``: the replacement functions, generated from the original's signature.
* ``ctypes_guards``: guarded locks, poll objects and C-type subclasses.
* ``drivers``: DB-API drivers (sqlite3, psycopg2) guarded through ``connect()``.
* ``table``: the catalogue, and patching it in and out.
* ``reporter``: the thread that hands events to sinks.
* ``guard``: :class:`BlockingGuard`, and fork handling.
"""

from .check import BlockingCallError, call_during
from .guard import BlockingGuard, Mode, running_guards
from .rules import DEFAULT_ALLOW, Allow, RuleHits, format_rules
from .table import CatalogueEntry, catalogue

__all__ = [
    "DEFAULT_ALLOW",
    "Allow",
    "BlockingCallError",
    "BlockingGuard",
    "CatalogueEntry",
    "Mode",
    "RuleHits",
    "call_during",
    "catalogue",
    "format_rules",
    "running_guards",
]
