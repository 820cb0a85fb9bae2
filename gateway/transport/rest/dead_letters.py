"""REST routes of kpg.v1.DeadLetters: topics, list, get, reprocess and discard."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from gateway.domain.dead_letters import DeadLetterFilter
from gateway.services.dead_letters import DeadLetters
from gateway.transport import convert


def dead_letters_router(dead_letters: DeadLetters) -> APIRouter:
    router = APIRouter(tags=["DeadLetters"])

    @router.get(
        "/v1/dead-letters",
        name="DeadLetters.ListDeadLetterTopics",
        operation_id="DeadLetters.ListDeadLetterTopics",
    )
    async def list_topics() -> dict[str, Any]:
        return convert.message_to_json(convert.dead_letter_topics_to_pb(await dead_letters.list_topics()))

    @router.get(
        "/v1/dead-letters/{dlt_topic}",
        name="DeadLetters.ListDeadLetters",
        operation_id="DeadLetters.ListDeadLetters",
    )
    async def list_dead_letters(
        dlt_topic: str,
        original_topic: Annotated[str, Query(alias="originalTopic")] = "",
        error_class: Annotated[str, Query(alias="errorClass")] = "",
        key: Annotated[str, Query(description="the record key, as UTF-8 text")] = "",
        since: Annotated[str, Query(description="RFC 3339: dead-lettered at or after")] = "",
        until: Annotated[str, Query(description="RFC 3339: dead-lettered before")] = "",
        state: Annotated[str, Query(description="NEW, REPROCESSED or DISCARDED")] = "",
        limit: Annotated[int, Query(ge=0)] = 0,
        page_token: Annotated[str, Query(alias="pageToken")] = "",
    ) -> dict[str, Any]:
        filters = DeadLetterFilter(
            original_topic=original_topic,
            error_class=error_class,
            key=key.encode() if key else None,
            since_ms=convert.timestamp_from_text(since, "since"),
            until_ms=convert.timestamp_from_text(until, "until"),
            state=convert.dead_letter_state_from_text(state),
        )
        page = await dead_letters.list_dead_letters(dlt_topic, filters, limit=limit, page_token=page_token)
        return convert.message_to_json(convert.dead_letter_page_to_pb(page))

    @router.get(
        "/v1/dead-letters/{dlt_topic}/{partition}/{offset}",
        name="DeadLetters.GetDeadLetter",
        operation_id="DeadLetters.GetDeadLetter",
    )
    async def get_dead_letter(dlt_topic: str, partition: int, offset: int) -> dict[str, Any]:
        letter = await dead_letters.get(dlt_topic, partition, offset)
        return convert.message_to_json(convert.dead_letter_to_pb(letter))

    @router.post(
        "/v1/dead-letters/{dlt_topic}/reprocess",
        name="DeadLetters.Reprocess",
        operation_id="DeadLetters.Reprocess",
    )
    async def reprocess(
        dlt_topic: str,
        body: Annotated[
            Any, Body(description="ReprocessRequest as proto3 JSON (dltTopic from the path)")
        ] = None,
    ) -> dict[str, Any]:
        message = convert.reprocess_body_to_pb(body, dlt_topic=dlt_topic)
        result = await dead_letters.reprocess(convert.reprocess_from_pb(message))
        return convert.message_to_json(convert.reprocess_result_to_pb(result))

    @router.post(
        "/v1/dead-letters/{dlt_topic}/discard",
        name="DeadLetters.Discard",
        operation_id="DeadLetters.Discard",
    )
    async def discard(
        dlt_topic: str,
        body: Annotated[
            Any, Body(description="DiscardRequest as proto3 JSON (dltTopic from the path)")
        ] = None,
    ) -> dict[str, Any]:
        message = convert.discard_body_to_pb(body, dlt_topic=dlt_topic)
        discarded = await dead_letters.discard(dlt_topic, list(message.ids), message.reason)
        return convert.message_to_json(convert.discard_result_to_pb(discarded))

    return router
