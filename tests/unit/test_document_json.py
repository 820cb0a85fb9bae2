"""REST Get's body is built without a message; it must equal the proto3 JSON of the gRPC answer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.adapters.sql.documents import DocumentRow
from gateway.services.read_models import Document
from gateway.transport.convert import document_to_json, document_to_pb, message_to_json


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"n": 40, "f": 1.5, "b": True, "off": False, "z": None, "s": "x"},
        {"nested": {"l": [1, "x", None, {"a": 2, "b": [True, 2.5]}], "big": 2**60, "neg": -3}},
    ],
)
@pytest.mark.parametrize(
    "updated_at",
    [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)],
)
def test_the_rest_body_is_the_proto3_json_of_the_grpc_answer(
    data: dict[str, Any], updated_at: datetime
) -> None:
    row = DocumentRow(
        key="o-1", data=data, version=2**40, position="pos", partition=3, offset=7, updated_at=updated_at
    )
    document = Document(read_model="summary", row=row)
    assert document_to_json(document) == message_to_json(document_to_pb(document))
