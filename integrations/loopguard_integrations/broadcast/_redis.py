"""The Redis backplane: one pub/sub connection per Broadcast, reconnects, loss counting.

Publishing goes through a small redis-py connection pool; receiving through one
pub/sub connection read by one task. When that connection is lost (Redis restarted, a
network cut, a server that stops answering pings) the task logs once, counts the
error, and reconnects with capped exponential backoff and jitter, subscribing again to
every channel still listened to. Subscribers never see an exception: their messages
simply stop during the outage, and what was published meanwhile is counted as lost
through the publishers' sequence numbers (:mod:`._envelope`).

redis-py's own retries are switched off for the pub/sub connection: one reconnect loop,
owned here, so an outage is logged and counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loopguard import metrics

from ._envelope import GapCounter, Numbering, Unpacked, new_origin, pack, unpack
from ._types import BackplaneUnavailable, BroadcastStats
from ._url import BroadcastURL

__all__ = ["RedisBackplane", "require_redis"]

logger = logging.getLogger("loopguard.broadcast")

Deliver = Callable[[str, "str | bytes"], Awaitable[None]]

# Backoff between reconnect attempts: 50 ms doubling to 2 s, +-25 % jitter.
_BACKOFF_FIRST = 0.05
_BACKOFF_CAP = 2.0
# An idle connection is pinged after this long, and declared lost after three times it.
_IDLE_PING = 5.0
_SUBSCRIBE_WAIT = 5.0


def _backoff(attempt: int) -> float:
    delay = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2**attempt)
    return float(delay * random.uniform(0.75, 1.25))


def require_redis(url: str) -> None:
    """Import redis-py now, at construction.

    Construction usually happens before the loop runs; importing redis-py takes a few
    hundred milliseconds that would otherwise stall the loop in ``connect()``.

    Raises:
        ImportError: redis-py is not installed; the message says how to get it.
    """
    try:
        import redis.asyncio
        import redis.asyncio.retry
        import redis.backoff  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"Broadcast({url!r}) needs redis-py: pip install 'redis>=5'") from exc


def _client_options() -> dict[str, Any]:
    """Options for every redis-py client made here.

    redis-py 7 and later look their own version up in the package metadata (a scan of
    the file system) each time they create a connection, on the event loop; telling
    them the version they already know avoids that blocking call.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py < 7 computes it once, at import
        return {}
    import redis

    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


def _error_type(exc: BaseException) -> str:
    return type(exc).__name__


class RedisBackplane:
    """Publishes to and listens on Redis for one :class:`Broadcast`."""

    def __init__(
        self,
        url: BroadcastURL,
        deliver: Deliver,
        stats: BroadcastStats,
        *,
        connect_timeout: float,
    ) -> None:
        self._url = url
        self._deliver = deliver
        self._stats = stats
        self._connect_timeout = connect_timeout
        self._origin = new_origin()
        self._numbering = Numbering()
        self._gaps = GapCounter()
        self._channels: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._publisher: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._outage_since: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, retrying for up to ``connect_timeout`` seconds; start the reader."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One immediate retry: a pooled connection broken by a Redis restart is
        # replaced on the next publish instead of failing it.
        self._publisher = Redis.from_url(
            self._url.url,
            retry=Retry(NoBackoff(), 1),
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            **_client_options(),
        )
        deadline = time.monotonic() + self._connect_timeout
        attempt, last = 0, None
        while True:
            try:
                await self._open()
                break
            except Exception as exc:
                last = exc
                if time.monotonic() + _backoff(attempt) > deadline:
                    await self._close_clients()
                    raise BackplaneUnavailable(
                        f"could not connect to Redis at {self._url.safe} after "
                        f"{attempt + 1} attempts over {self._connect_timeout:g} s: {exc}"
                    ) from last
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
        self._reader = asyncio.create_task(self._read(), name="loopguard-broadcast-redis")

    async def stop(self) -> None:
        """Stop reading and close both connections."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        for future in self._confirm.values():
            future.cancel()
        self._confirm.clear()
        await self._close_clients()

    async def _close_clients(self) -> None:
        await self._drop_pubsub()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                await publisher.aclose()

    async def _open(self) -> None:
        """Open the pub/sub connection and subscribe to every channel listened to."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = Redis.from_url(
            self._url.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2.0,
            **_client_options(),
        )
        pubsub: Any = client.pubsub()
        try:
            await pubsub.ping()  # opens the connection, fails fast if Redis is away
            if self._channels:
                await pubsub.subscribe(*self._channels)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()
            raise
        self._pubsub = (client, pubsub)
        self._up.set()

    async def _drop_pubsub(self) -> None:
        self._up.clear()
        held, self._pubsub = self._pubsub, None
        if held is not None:
            client, pubsub = held
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Listen to a channel; waits (a few seconds at most) until Redis confirms it.

        During an outage it only records the channel: it is subscribed on reconnect.
        """
        self._channels.add(channel)
        held = self._pubsub
        if held is None:
            return
        future = self._confirm.get(channel)
        if future is None:
            future = self._confirm[channel] = asyncio.get_running_loop().create_future()
        try:
            await held[1].subscribe(channel)
            await asyncio.wait_for(asyncio.shield(future), _SUBSCRIBE_WAIT)
        except Exception:
            # A lost connection: the reader sees it too, and resubscribes on reconnect.
            logger.debug("subscribe to %r not confirmed yet", channel, exc_info=True)
        finally:
            if self._confirm.get(channel) is future and future.done():
                del self._confirm[channel]

    async def unsubscribe(self, channel: str) -> None:
        """Stop listening to a channel."""
        self._channels.discard(channel)
        self._gaps.forget(channel)
        held = self._pubsub
        if held is not None:
            with contextlib.suppress(Exception):
                await held[1].unsubscribe(channel)

    # -- publishing ------------------------------------------------------------------

    async def publish(self, channel: str, message: str | bytes) -> None:
        """Send a message to every process listening to the channel.

        Raises:
            BackplaneUnavailable: Redis could not take it (the message reached no one).
        """
        from redis.exceptions import RedisError

        seq = self._numbering.next(channel)
        payload = pack(self._origin, seq, time.time(), message)
        publisher = self._publisher
        if publisher is None:
            raise BackplaneUnavailable(f"the Redis backplane at {self._url.safe} is closed")
        try:
            await publisher.publish(channel, payload)
        except (RedisError, OSError) as exc:
            self._count_error(exc)
            raise BackplaneUnavailable(
                f"could not publish to Redis at {self._url.safe}: {exc}"
            ) from exc

    # -- receiving -------------------------------------------------------------------

    async def _read(self) -> None:
        idle_since = time.monotonic()
        pinged = False
        while True:
            held = self._pubsub
            if held is None:
                await self._reconnect()
                idle_since, pinged = time.monotonic(), False
                continue
            try:
                raw = await held[1].get_message(timeout=1.0)
                now = time.monotonic()
                if raw is None:
                    if now - idle_since > 3 * _IDLE_PING:
                        raise TimeoutError(f"no answer from Redis for {now - idle_since:.0f} s")
                    if now - idle_since > _IDLE_PING and not pinged:
                        await held[1].ping()
                        pinged = True
                    continue
                idle_since, pinged = now, False
                await self._handle(raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
                await self._drop_pubsub()

    async def _handle(self, raw: dict[str, Any]) -> None:
        kind = raw.get("type")
        channel = raw.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "subscribe":
            future = self._confirm.get(channel)  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind != "message" or not isinstance(channel, str):
            return
        got = unpack(raw["data"])
        if got.origin is None:
            self._stats.foreign += 1
        elif got.origin == self._origin:
            self._stats.echoes += 1  # already delivered locally by publish()
            return
        else:
            self._count_gap(channel, got)
        await self._deliver(channel, got.message)

    def _count_gap(self, channel: str, got: Unpacked) -> None:
        assert got.origin is not None
        self._stats.received += 1
        missing = self._gaps.missing(got.origin, channel, got.seq)
        if missing:
            self._stats.lost += missing
            metrics.record(metrics.BROADCAST_BACKPLANE_LOST, missing)
        metrics.record(metrics.BROADCAST_BACKPLANE_LAG, max(0.0, time.time() - got.sent_at))

    def _count_error(self, exc: BaseException) -> None:
        kind = _error_type(exc)
        self._stats.error(kind)
        metrics.record(metrics.BROADCAST_BACKPLANE_ERRORS, 1, {"error.type": kind})

    def _lost(self, exc: BaseException) -> None:
        self._count_error(exc)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "lost the Redis pub/sub connection to %s (%s: %s); reconnecting, "
                "messages published meanwhile are lost and counted",
                self._url.safe,
                type(exc).__name__,
                exc,
            )

    async def _reconnect(self) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(_backoff(attempt))
            try:
                await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._count_error(exc)
                attempt += 1
                continue
            since, self._outage_since = self._outage_since, None
            self._stats.reconnects += 1
            metrics.record(metrics.BROADCAST_BACKPLANE_RECONNECTS, 1)
            logger.warning(
                "reconnected to Redis at %s after %.1f s (%d attempts); %d channels subscribed",
                self._url.safe,
                time.monotonic() - since if since is not None else 0.0,
                attempt + 1,
                len(self._channels),
            )
            return
