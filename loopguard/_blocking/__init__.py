"""The blocking-call guard subsystem: the catalogue of calls that block, and the guard."""

from .guard import (
    DEFAULT_ALLOW,
    Allow,
    BlockingCallError,
    BlockingGuard,
    CatalogueEntry,
    Mode,
    RuleHits,
    call_during,
    catalogue,
    format_rules,
    running_guards,
)

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
