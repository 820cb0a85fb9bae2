"""kpg.v1.DeadLetters over gRPC: convert, call the service, convert back."""

from __future__ import annotations

from typing import Any

import grpc
from kpg.v1 import dead_letters_pb2, dead_letters_pb2_grpc

from gateway.services.dead_letters import DeadLetters
from gateway.transport import convert


class DeadLettersServicer(dead_letters_pb2_grpc.DeadLettersServicer):
    def __init__(self, dead_letters: DeadLetters) -> None:
        self._dead_letters = dead_letters

    async def ListDeadLetterTopics(
        self,
        request: dead_letters_pb2.ListDeadLetterTopicsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> dead_letters_pb2.ListDeadLetterTopicsResponse:
        return convert.dead_letter_topics_to_pb(await self._dead_letters.list_topics())

    async def ListDeadLetters(
        self, request: dead_letters_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dead_letters_pb2.ListDeadLettersResponse:
        page = await self._dead_letters.list_dead_letters(
            request.dlt_topic,
            convert.dead_letter_filter_from_pb(request),
            limit=request.limit,
            page_token=request.page_token,
        )
        return convert.dead_letter_page_to_pb(page)

    async def GetDeadLetter(
        self, request: dead_letters_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dead_letters_pb2.DeadLetter:
        letter = await self._dead_letters.get(request.dlt_topic, request.partition, request.offset)
        return convert.dead_letter_to_pb(letter)

    async def Reprocess(
        self, request: dead_letters_pb2.ReprocessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dead_letters_pb2.ReprocessResponse:
        result = await self._dead_letters.reprocess(convert.reprocess_from_pb(request))
        return convert.reprocess_result_to_pb(result)

    async def Discard(
        self, request: dead_letters_pb2.DiscardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dead_letters_pb2.DiscardResponse:
        discarded = await self._dead_letters.discard(request.dlt_topic, list(request.ids), request.reason)
        return convert.discard_result_to_pb(discarded)
