"""Parsing and checking a broadcast URL (``memory://``, ``redis://HOST:PORT[/DB]``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["SCHEMES", "BroadcastURL", "parse_url"]

SCHEMES = ("memory", "redis", "rediss")


@dataclass(frozen=True)
class BroadcastURL:
    """A checked broadcast URL.

    Attributes:
        scheme: ``"memory"``, ``"redis"`` or ``"rediss"`` (TLS).
        url: The URL as given (passed to redis-py, may hold a password).
        safe: The URL with any password replaced by ``***``, for messages and logs.
    """

    scheme: str
    url: str
    safe: str


def parse_url(url: object) -> BroadcastURL:
    """Check a broadcast URL; raise ``ValueError`` naming what is wrong with it.

    Args:
        url: ``"memory://"``, ``"redis://HOST[:PORT][/DB]"`` or ``"rediss://..."``.

    Returns:
        The checked URL.

    Raises:
        TypeError: ``url`` is not a string.
        ValueError: Unknown scheme, or a malformed URL.
    """
    if not isinstance(url, str):
        raise TypeError(f"Broadcast url must be a str like 'redis://localhost:6379', got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        expected = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(
            f"Broadcast url {url!r}: unknown scheme {parts.scheme!r} (expected one of {expected})"
        )
    if scheme == "memory":
        if parts.netloc or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"Broadcast url {url!r}: a memory URL takes nothing after 'memory://'")
        return BroadcastURL("memory", url, url)
    safe = url
    if parts.password:
        safe = url.replace(f":{parts.password}@", ":***@", 1)
    if not parts.hostname:
        raise ValueError(f"Broadcast url {safe!r}: no host (expected redis://HOST:PORT[/DB])")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"Broadcast url {safe!r}: the port is not a number from 0 to 65535"
        ) from None
    if port == 0:
        raise ValueError(f"Broadcast url {safe!r}: port 0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(
            f"Broadcast url {safe!r}: the database {db!r} is not a number "
            "(expected redis://HOST:PORT/DB)"
        )
    return BroadcastURL(scheme, url, safe)
