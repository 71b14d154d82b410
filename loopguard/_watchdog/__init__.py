"""The watchdog subsystem: heartbeats, the sampler thread, stall causes, loop statistics.

``config`` declares every option once; ``watchdog`` holds :class:`Watchdog`;
``registry`` the running watchdogs and the loop hooks; ``loopwatch`` one loop's
heartbeat;
``sampling`` reads and folds the loop thread's stack; ``causes`` tells why a loop was
held; ``gcwatch`` notes garbage-collection pauses; ``precise`` times every callback
(opt-in); ``loopload`` reads a loop's recent load; ``loopstats`` measures utilization
and queue depth; ``summary`` keeps the exit summary and the delay histogram.
"""

from .config import ENV_PREFIX, BlockingMode, Config, EnvOption, env_options
from .loopload import MAX_WINDOW, LoopLoad, lag_of, load_of
from .loopstats import LoopStatsSnapshot
from .registry import watches_of
from .summary import StallSummary
from .watchdog import Watchdog, running

__all__ = [
    "ENV_PREFIX",
    "BlockingMode",
    "Config",
    "MAX_WINDOW",
    "EnvOption",
    "LoopLoad",
    "LoopStatsSnapshot",
    "StallSummary",
    "Watchdog",
    "env_options",
    "lag_of",
    "load_of",
    "running",
    "watches_of",
]
