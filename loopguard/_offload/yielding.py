"""Handing control back to the loop from async code that seldom awaits.

It owns :func:`checkpoint`, which hands control back once, and :func:`yielding`,
which wraps a long iteration so that it hands control back whenever its time budget
is spent.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from time import perf_counter
from typing import Generic, TypeVar, overload

import anyio.lowlevel

from .common import DEFAULT_BUDGET

__all__ = ["checkpoint", "yielding"]

T = TypeVar("T")


async def checkpoint() -> None:
    """Hand control back to the event loop once, and let a pending cancellation in.

    Other tasks and callbacks that are ready run before this returns. Works on
    asyncio, uvloop and trio.
    """
    await anyio.lowlevel.checkpoint()


@overload
def yielding(iterable: AsyncIterable[T], every: float = DEFAULT_BUDGET) -> AsyncIterator[T]: ...


@overload
def yielding(iterable: Iterable[T], every: float = DEFAULT_BUDGET) -> AsyncIterator[T]: ...


def yielding(
    iterable: Iterable[T] | AsyncIterable[T], every: float = DEFAULT_BUDGET
) -> AsyncIterator[T]:
    """Iterate with ``async for``, handing control back to the loop every ``every`` seconds.

    The budget counts all the time since the loop last had control: producing items
    and the body of your ``async for`` alike. When it is spent, the next step first
    awaits :func:`checkpoint` (which also lets cancellation in), then goes on. Cheap
    iterations pay one clock read per item.

    Args:
        iterable: Any iterable, or an async iterable that seldom awaits.
        every: The time budget in seconds (``0``: hand control back before every item).

    Returns:
        An async iterator over the same items.

    Raises:
        ValueError: ``every`` is negative or not a number.
    """
    if not isinstance(every, (int, float)) or not every >= 0:
        raise ValueError(f"yielding(every=...) takes seconds >= 0, not {every!r}")
    if isinstance(iterable, AsyncIterable):
        return _YieldingAsync(iterable, float(every))
    return _Yielding(iter(iterable), float(every))


# The two iterators repeat their few lines of pacing on purpose: __anext__ runs per
# item, and a shared helper method cost 20 % more per item in a timeit run.
class _Yielding(AsyncIterator[T], Generic[T]):
    __slots__ = ("_deadline", "_every", "_iterator")

    def __init__(self, iterator: Iterator[T], every: float) -> None:
        self._iterator = iterator
        self._every = every
        self._deadline: float | None = None

    async def __anext__(self) -> T:
        now = perf_counter()
        if self._deadline is None:
            self._deadline = now + self._every
        elif now >= self._deadline:
            await anyio.lowlevel.checkpoint()
            self._deadline = perf_counter() + self._every
        try:
            return next(self._iterator)
        except StopIteration:
            raise StopAsyncIteration from None


class _YieldingAsync(AsyncIterator[T], Generic[T]):
    __slots__ = ("_deadline", "_every", "_iterator")

    def __init__(self, iterable: AsyncIterable[T], every: float) -> None:
        self._iterator = aiter(iterable)
        self._every = every
        self._deadline: float | None = None

    async def __anext__(self) -> T:
        now = perf_counter()
        if self._deadline is None:
            self._deadline = now + self._every
        elif now >= self._deadline:
            await anyio.lowlevel.checkpoint()
            self._deadline = perf_counter() + self._every
        return await anext(self._iterator)
