"""The offload subsystem: ``@offload``, adaptive offload, ``yielding()`` and ``checkpoint()``."""

from .offload import DEFAULT_BUDGET, checkpoint, offload, set_offload_limit, yielding

__all__ = ["DEFAULT_BUDGET", "checkpoint", "offload", "set_offload_limit", "yielding"]
