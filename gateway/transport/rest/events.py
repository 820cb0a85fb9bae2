"""REST routes of kpg.v1.EventStore: append, read, and Server-Sent Events for Subscribe."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import StreamingResponse

from gateway.domain.events import ReadStreamQuery, SubscribeQuery
from gateway.errors import GatewayError
from gateway.services.events import EventStore
from gateway.transport import convert
from gateway.transport.rest.errors import error_body
from gateway.transport.rest.sse import SseResponse


def event_store_router(store: EventStore, *, write_timeout_s: float) -> APIRouter:
    router = APIRouter(tags=["EventStore"])

    @router.post(
        "/v1/streams/{category}/{stream_id}/events",
        name="EventStore.AppendEvents",
        operation_id="EventStore.AppendEvents",
    )
    async def append_events(
        category: str,
        stream_id: str,
        body: Annotated[Any, Body(description="AppendEventsRequest as proto3 JSON; JSON event data as JSON")],
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, Any]:
        message = convert.append_body_to_pb(body, category=category, stream_id=stream_id)
        if idempotency_key:
            message.idempotency_key = idempotency_key
        result = await store.append(convert.append_from_pb(message))
        return convert.message_to_json(convert.append_result_to_pb(result))

    @router.get(
        "/v1/streams/{category}/{stream_id}/events",
        name="EventStore.ReadStream",
        operation_id="EventStore.ReadStream",
    )
    async def read_stream(
        category: str,
        stream_id: str,
        # Ranges are checked by ReadStreamQuery, as for gRPC, so a bad field has one name.
        from_version: Annotated[int, Query(alias="fromVersion")] = 0,
        max_count: Annotated[int, Query(alias="maxCount")] = 0,
        backwards: bool = False,
        min_position: Annotated[str, Query(alias="minPosition")] = "",
        wait_timeout_ms: Annotated[int, Query(alias="waitTimeoutMs")] = 0,
    ) -> dict[str, Any]:
        query = ReadStreamQuery(
            category,
            stream_id,
            from_version=from_version,
            max_count=max_count,
            backwards=backwards,
            min_position=min_position,
            wait_timeout_ms=wait_timeout_ms,
        )
        events, head = await store.read_stream(query)
        return {"events": [convert.event_to_json(e) for e in events], "streamVersion": str(head)}

    @router.get(
        "/v1/streams/{category}/subscribe",
        name="EventStore.Subscribe",
        operation_id="EventStore.Subscribe",
        response_class=StreamingResponse,
    )
    async def subscribe(
        category: str,
        stream_id: Annotated[str, Query(alias="streamId")] = "",
        from_version: Annotated[int, Query(alias="fromVersion")] = 0,
        from_position: Annotated[str, Query(alias="fromPosition")] = "",
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: `id` is the position after the event (EventSource resumes with it)."""
        query = SubscribeQuery(
            category, stream_id, from_version=from_version, from_position=last_event_id or from_position
        )
        events = await store.subscribe(query)
        return SseResponse(_sse(events), write_timeout_s=write_timeout_s)

    return router


async def _sse(events: AsyncIterator[tuple[Any, str]]) -> AsyncIterator[str]:
    try:
        async for event, position in events:
            data = json.dumps(convert.event_to_json(event, position=position))
            yield f"id: {position}\nevent: event\ndata: {data}\n\n"
    except GatewayError as exc:
        yield f"event: error\ndata: {json.dumps(error_body(exc))}\n\n"
