"""REST routes of kpg.v1.RequestReply: `POST /v1/requests/{topic}` waits for the reply, or with
`Prefer: respond-async` answers 202 at once with `Location: /v1/replies/{correlation_id}`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import JSONResponse

from gateway.services.request_reply import RequestReply
from gateway.transport import convert


def request_reply_router(requests: RequestReply) -> APIRouter:
    router = APIRouter(tags=["RequestReply"])

    @router.post("/v1/requests/{topic}", name="RequestReply.Request", operation_id="RequestReply.Request")
    async def request(
        topic: str,
        body: Annotated[
            Any, Body(description="RequestMessage as proto3 JSON; a non-string `payload` is sent as JSON")
        ] = None,
        prefer: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Any:
        message = convert.request_body_to_pb(body, topic=topic)
        if idempotency_key:
            message.idempotency_key = idempotency_key
        if prefer and "respond-async" in prefer.lower():
            correlation_id = await requests.submit(convert.request_from_pb(message))
            return JSONResponse(
                {"correlationId": correlation_id},
                status_code=202,
                headers={"Location": f"/v1/replies/{correlation_id}", "Preference-Applied": "respond-async"},
            )
        reply = await requests.request(convert.request_from_pb(message))
        return convert.message_to_json(convert.reply_to_pb(reply))

    @router.get(
        "/v1/replies/{correlation_id}", name="RequestReply.GetReply", operation_id="RequestReply.GetReply"
    )
    async def get_reply(
        correlation_id: str, wait_timeout_ms: Annotated[int, Query(alias="waitTimeoutMs", ge=0)] = 0
    ) -> dict[str, Any]:
        reply = await requests.get_reply(correlation_id, wait_timeout_ms)
        return convert.message_to_json(convert.reply_to_pb(reply))

    return router
