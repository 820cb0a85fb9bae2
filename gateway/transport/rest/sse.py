"""`SseResponse`: a Server-Sent Events stream whose writes time out (Subscribe, WatchSaga)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Send

from gateway.errors import SubscriberTooSlow


class SseResponse(StreamingResponse):
    """A stream whose writes time out: a client that stops reading is disconnected, not buffered for."""

    def __init__(self, content: AsyncIterator[str], *, write_timeout_s: float) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._write_timeout_s = write_timeout_s

    async def stream_response(self, send: Send) -> None:
        timeout = self._write_timeout_s

        async def timed_send(message: Any) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except TimeoutError:
                raise SubscriberTooSlow("the subscriber stopped reading") from None

        await super().stream_response(timed_send)
