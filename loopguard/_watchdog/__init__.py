"""The watchdog subsystem: heartbeats, the sampler thread, stall causes, loop statistics.

``watchdog`` holds :class:`Watchdog` and the registry of running watchdogs;
``sampling`` reads and folds the loop thread's stack; ``causes`` tells why a loop was
held; ``gcwatch`` notes garbage-collection pauses; ``precise`` times every callback
(opt-in); ``loopstats`` measures utilization and queue depth; ``summary`` keeps the
exit summary and the delay histogram.
"""

from .watchdog import Watchdog, running

__all__ = ["Watchdog", "running"]
