"""One error root for the whole gateway.

Every failure a caller can see is a `GatewayError` with a stable `reason` from the contract's
error table. Each transport maps it exactly once (gRPC interceptor, FastAPI exception handler);
nothing else builds error payloads.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Reason(enum.Enum):
    """The contract's error reasons, each with its gRPC code and HTTP status.

    Members share mappings (REPLY_TIMEOUT and READ_MODEL_BEHIND are both DEADLINE_EXCEEDED/504), so
    each gets a value of its own: an enum would otherwise make the second an alias of the first."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400)
    PAYLOAD_TOO_LARGE = ("INVALID_ARGUMENT", 413)
    WRONG_EXPECTED_VERSION = ("FAILED_PRECONDITION", 409)
    IDEMPOTENCY_KEY_REUSED = ("INVALID_ARGUMENT", 422)
    IDEMPOTENCY_KEY_IN_FLIGHT = ("ABORTED", 409)
    NOT_FOUND = ("NOT_FOUND", 404)
    TOPIC_NOT_ALLOWED = ("PERMISSION_DENIED", 403)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 401)
    REPLY_TIMEOUT = ("DEADLINE_EXCEEDED", 504)
    READ_MODEL_BEHIND = ("DEADLINE_EXCEEDED", 504)
    BACKEND_UNAVAILABLE = ("UNAVAILABLE", 503)
    # Not in the contract's table: answered only by RPCs whose pattern has not landed yet.
    UNIMPLEMENTED = ("UNIMPLEMENTED", 501)
    SUBSCRIBER_TOO_SLOW = ("RESOURCE_EXHAUSTED", 429)
    RATE_LIMITED = ("RESOURCE_EXHAUSTED", 429)

    def __new__(cls, grpc_code: str, http_status: int) -> Reason:
        member = object.__new__(cls)
        member._value_ = len(cls.__members__)
        return member

    def __init__(self, grpc_code: str, http_status: int) -> None:
        self.grpc_code = grpc_code  # grpc.StatusCode member name; transport.grpc resolves it
        self.http_status = http_status


ERROR_DOMAIN = "kpg"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class GatewayError(Exception):
    """Root of every error the gateway reports to a caller."""

    reason: Reason = Reason.INVALID_ARGUMENT
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if retryable is not None:
            self.retryable = retryable
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations = violations


class InvalidArgument(GatewayError):
    reason = Reason.INVALID_ARGUMENT

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", violations=(FieldViolation(field, description),))


class PayloadTooLarge(GatewayError):
    reason = Reason.PAYLOAD_TOO_LARGE


class WrongExpectedVersion(GatewayError):
    reason = Reason.WRONG_EXPECTED_VERSION


class IdempotencyKeyReused(GatewayError):
    reason = Reason.IDEMPOTENCY_KEY_REUSED


class IdempotencyKeyInFlight(GatewayError):
    reason = Reason.IDEMPOTENCY_KEY_IN_FLIGHT
    retryable = True


class NotFound(GatewayError):
    reason = Reason.NOT_FOUND


class TopicNotAllowed(GatewayError):
    reason = Reason.TOPIC_NOT_ALLOWED


class Unauthenticated(GatewayError):
    reason = Reason.UNAUTHENTICATED


class ReplyTimeout(GatewayError):
    reason = Reason.REPLY_TIMEOUT
    retryable = True


class ReadModelBehind(GatewayError):
    reason = Reason.READ_MODEL_BEHIND
    retryable = True


class BackendUnavailable(GatewayError):
    reason = Reason.BACKEND_UNAVAILABLE
    retryable = True


class NotImplementedYet(GatewayError):
    reason = Reason.UNIMPLEMENTED

    def __init__(self, rpc: str, pattern: str) -> None:
        super().__init__(
            f"{rpc} is not implemented yet: it arrives with the {pattern} pattern",
            metadata={"rpc": rpc, "pattern": pattern},
        )


class SubscriberTooSlow(GatewayError):
    reason = Reason.SUBSCRIBER_TOO_SLOW
    retryable = True


class RateLimited(GatewayError):
    """Over a bound the gateway keeps to stay responsive (queued appends, subscribers): retry later."""

    reason = Reason.RATE_LIMITED
    retryable = True

    def __init__(
        self, message: str, *, retry_after_ms: int, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata={**(metadata or {}), "retry_after_ms": str(retry_after_ms)})
