"""The contract's error table, row by row, and how each transport renders a GatewayError."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway.errors import BackendUnavailable, InvalidArgument, Reason, WrongExpectedVersion
from gateway.transport.grpc.interceptors import to_status
from gateway.transport.rest.errors import error_body

CONTRACT = {
    "INVALID_ARGUMENT": ("INVALID_ARGUMENT", 400),
    "PAYLOAD_TOO_LARGE": ("INVALID_ARGUMENT", 413),
    "WRONG_EXPECTED_VERSION": ("FAILED_PRECONDITION", 409),
    "IDEMPOTENCY_KEY_REUSED": ("INVALID_ARGUMENT", 422),
    "IDEMPOTENCY_KEY_IN_FLIGHT": ("ABORTED", 409),
    "NOT_FOUND": ("NOT_FOUND", 404),
    "TOPIC_NOT_ALLOWED": ("PERMISSION_DENIED", 403),
    "UNAUTHENTICATED": ("UNAUTHENTICATED", 401),
    "REPLY_TIMEOUT": ("DEADLINE_EXCEEDED", 504),
    "READ_MODEL_BEHIND": ("DEADLINE_EXCEEDED", 504),
    "BACKEND_UNAVAILABLE": ("UNAVAILABLE", 503),
}


@pytest.mark.parametrize(("reason", "expected"), CONTRACT.items())
def test_every_reason_maps_as_the_contract_says(reason: str, expected: tuple[str, int]) -> None:
    member = Reason[reason]
    assert (member.name, member.grpc_code, member.http_status) == (reason, *expected)


def test_reasons_sharing_a_mapping_stay_distinct() -> None:
    # Iterating an enum skips aliases: every reason must be a member of its own.
    assert [r.name for r in Reason] == list(Reason.__members__)


def test_proto_error_reason_enum_lists_the_same_reasons() -> None:
    from kpg.v1 import common_pb2

    declared = common_pb2.ErrorReason.keys()
    names = {n.removeprefix("ERROR_REASON_") for n in declared} - {"UNSPECIFIED"}
    assert names == set(CONTRACT)


def _details(status: grpc.Status) -> status_pb2.Status:
    (value,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


def test_grpc_status_carries_error_info_and_bad_request() -> None:
    status = to_status(InvalidArgument.field("events[0].type", "must not be empty"))

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    details = _details(status)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert details.details[0].Unpack(info) and details.details[1].Unpack(bad)
    assert (info.domain, info.reason) == ("kpg", "INVALID_ARGUMENT")
    assert bad.field_violations[0].field == "events[0].type"


def test_grpc_status_metadata() -> None:
    status = to_status(WrongExpectedVersion("stream moved", metadata={"expected": "3", "actual": "5"}))

    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    info = error_details_pb2.ErrorInfo()
    assert _details(status).details[0].Unpack(info)
    assert dict(info.metadata) == {"expected": "3", "actual": "5"}


def test_rest_body_has_the_contract_shape() -> None:
    assert error_body(BackendUnavailable("Redis is unavailable")) == {
        "error": {
            "code": 503,
            "status": "UNAVAILABLE",
            "reason": "BACKEND_UNAVAILABLE",
            "message": "Redis is unavailable",
            "metadata": {},
        }
    }
