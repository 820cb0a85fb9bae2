"""The iterators `subscribe` and `watch_saga` return: iterate them, and close them (or use them in a `with`
block) to cancel the call when you stop early."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from types import TracebackType
from typing import Generic, TypeVar

__all__ = ["AsyncServerStream", "ServerStream"]

T = TypeVar("T")


class AsyncServerStream(Generic[T]):
    """An async iterator over a server stream (`async for item in stream`); `aclose()`, or leaving
    `async with stream:`, cancels the call. It reconnects by itself after UNAVAILABLE."""

    def __init__(self, items: AsyncGenerator[T, None]) -> None:
        self._items = items

    def __aiter__(self) -> AsyncServerStream[T]:
        return self

    async def __anext__(self) -> T:
        return await anext(self._items)

    async def aclose(self) -> None:
        """Cancel the call; iterating afterwards ends at once."""
        await self._items.aclose()

    async def __aenter__(self) -> AsyncServerStream[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class ServerStream(Generic[T]):
    """An iterator over a server stream (`for item in stream`); `close()`, or leaving `with stream:`,
    cancels the call. It reconnects by itself after UNAVAILABLE."""

    def __init__(self, items: Generator[T, None, None]) -> None:
        self._items = items

    def __iter__(self) -> ServerStream[T]:
        return self

    def __next__(self) -> T:
        return next(self._items)

    def close(self) -> None:
        """Cancel the call; iterating afterwards ends at once."""
        self._items.close()

    def __enter__(self) -> ServerStream[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
