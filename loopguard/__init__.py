"""loopguard: keep event loops honest.

See the documentation for the tutorial; this module only re-exports the public API.
"""

import sys as _sys

from . import _offload as _offload_package
from ._api import current as current
from ._api import install as install
from ._api import loop_lag as loop_lag
from ._api import loop_load as loop_load
from ._api import recent_stalls as recent_stalls
from ._api import report as report
from ._api import uninstall as uninstall
from ._api import watch as watch
from ._blocking import Allow as Allow
from ._blocking import BlockingCallError as BlockingCallError
from ._blocking import BlockingGuard as BlockingGuard
from ._core.attribution import attribute as attribute
from ._core.attribution import unattribute as unattribute
from ._offload import checkpoint as checkpoint
from ._offload import offload as offload
from ._offload import set_offload_limit as set_offload_limit
from ._offload import yielding as yielding
from ._version import __version__ as __version__
from ._watchdog import Config as Config
from ._watchdog import LoopLoad as LoopLoad
from ._watchdog import LoopStatsSnapshot as LoopStatsSnapshot
from ._watchdog import Watchdog as Watchdog
from .events import BlockingCall as BlockingCall
from .events import ConnectionClosed as ConnectionClosed
from .events import Event as Event
from .events import Frame as Frame
from .events import GcPause as GcPause
from .events import Hog as Hog
from .events import Offloaded as Offloaded
from .events import SlowCallback as SlowCallback
from .events import StackSample as StackSample
from .events import Stall as Stall
from .sinks import CallbackSink as CallbackSink
from .sinks import JsonLinesSink as JsonLinesSink
from .sinks import LoggingSink as LoggingSink
from .sinks import RecordingSink as RecordingSink
from .sinks import Sink as Sink

# ``from loopguard.offload import DEFAULT_BUDGET`` keeps working, while the name
# ``loopguard.offload`` itself is (and stays) the decorator, not a module.
_sys.modules[__name__ + ".offload"] = _offload_package

__all__ = [
    "Allow",
    "BlockingCall",
    "BlockingCallError",
    "BlockingGuard",
    "CallbackSink",
    "Config",
    "ConnectionClosed",
    "Event",
    "Frame",
    "GcPause",
    "Hog",
    "JsonLinesSink",
    "LoggingSink",
    "LoopLoad",
    "LoopStatsSnapshot",
    "Offloaded",
    "RecordingSink",
    "Sink",
    "SlowCallback",
    "StackSample",
    "Stall",
    "Watchdog",
    "__version__",
    "attribute",
    "checkpoint",
    "current",
    "install",
    "loop_lag",
    "loop_load",
    "offload",
    "recent_stalls",
    "report",
    "set_offload_limit",
    "unattribute",
    "uninstall",
    "watch",
    "yielding",
]
