"""Low-level pieces every subsystem shares: frames, patches, attribution.

Nothing here imports a subsystem (``_watchdog``, ``_blocking``, ``_offload``) or the
API layer; ``events`` is the only other part of loopguard these modules use.
"""
