"""Typed exceptions: one class per contract error reason, all under `KpgError`.

The gateway attaches `google.rpc.ErrorInfo` (domain `kpg`) to every error; `KpgError.from_rpc_error`
picks the class by its `reason`. A failure with no ErrorInfo (the gateway was not reached, a proxy
answered) is classified by its gRPC code: `Unavailable`, `DeadlineExceeded`, `Unauthenticated`, else a
plain `KpgError`. Branch on the class (or `reason`), never on the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc

from kpg.client import error_details

__all__ = [
    "BackendUnavailable",
    "DeadlineExceeded",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
    "InvalidArgument",
    "KpgError",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ReadModelBehind",
    "ReplyTimeout",
    "SubscriberTooSlow",
    "TopicNotAllowed",
    "Unauthenticated",
    "Unavailable",
    "WrongExpectedVersion",
]


class KpgError(Exception):
    """A failed gateway call: its gRPC `code`, the contract's `reason` ("" when the gateway sent none), the
    `message`, the ErrorInfo `metadata` and, for invalid fields, `field_violations` (field -> why)."""

    REASON: ClassVar[str] = ""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: dict[str, str] = dict(field_violations or {})

    def __reduce__(self) -> tuple[type[KpgError], tuple[object, ...]]:
        # Picklable (e.g. across processes) although __init__ takes more than the message.
        return type(self), (self.code, self.reason, self.message, self.metadata, self.field_violations)

    def __str__(self) -> str:
        return f"{self.reason or self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"
        )

    @staticmethod
    def from_rpc_error(error: grpc.RpcError) -> KpgError:
        """The typed exception for a failed call of the sync or the asyncio gRPC API."""
        details = error_details(error)
        if details.reason:
            cls = _BY_REASON.get(details.reason, KpgError)
        else:
            cls = _BY_CODE.get(details.code, KpgError)
        return cls(details.code, details.reason, details.message, details.metadata, details.field_violations)


class Unavailable(KpgError):
    """The gateway could not be reached, or answered UNAVAILABLE; safe to retry (the client already did)."""


class BackendUnavailable(Unavailable):
    """Kafka, Redis or the database is down behind the gateway; safe to retry with backoff."""

    REASON = "BACKEND_UNAVAILABLE"


class DeadlineExceeded(KpgError):
    """The call's deadline passed before an answer arrived."""


class ReplyTimeout(DeadlineExceeded):
    """No reply to a request arrived within its `timeout_ms`."""

    REASON = "REPLY_TIMEOUT"


class ReadModelBehind(DeadlineExceeded):
    """The read model (or stream index) had not applied `min_position` within the wait."""

    REASON = "READ_MODEL_BEHIND"


class InvalidArgument(KpgError):
    """A field, name or JSON body is invalid; `field_violations` says which and why."""

    REASON = "INVALID_ARGUMENT"


class PayloadTooLarge(KpgError):
    """An event, an append or a message exceeds a size or count limit."""

    REASON = "PAYLOAD_TOO_LARGE"


class WrongExpectedVersion(KpgError):
    """The stream's head version did not match the append's expectation.

    `actual` is the stream's head version (0: no stream), `expected` what the append asked for, as the
    gateway describes it (a version number or a state such as "NO_STREAM")."""

    REASON = "WRONG_EXPECTED_VERSION"

    @property
    def actual(self) -> int:
        """The stream's actual head version (-1 if the gateway did not say)."""
        try:
            return int(self.metadata.get("actual", "-1"))
        except ValueError:
            return -1

    @property
    def expected(self) -> str:
        """The expectation the append carried, as the gateway describes it."""
        return self.metadata.get("expected", "")


class IdempotencyKeyReused(KpgError):
    """The idempotency key was already used for a different request."""

    REASON = "IDEMPOTENCY_KEY_REUSED"


class IdempotencyKeyInFlight(KpgError):
    """A request with the same idempotency key is still being processed; retry later."""

    REASON = "IDEMPOTENCY_KEY_IN_FLIGHT"


class NotFound(KpgError):
    """The stream, document, saga, reply, dead letter, read model, saga type or category does not exist."""

    REASON = "NOT_FOUND"


class TopicNotAllowed(KpgError):
    """The topic is not in the definitions file's request-reply allowlist."""

    REASON = "TOPIC_NOT_ALLOWED"


class Unauthenticated(KpgError):
    """Missing or invalid credentials."""

    REASON = "UNAUTHENTICATED"


class RateLimited(KpgError):
    """The gateway is over one of its bounds; retry after `retry_after_ms` (the client already did)."""

    REASON = "RATE_LIMITED"

    @property
    def retry_after_ms(self) -> int | None:
        """How long the gateway asks callers to wait before retrying, if it said."""
        try:
            return int(self.metadata["retry_after_ms"])
        except (KeyError, ValueError):
            return None


class SubscriberTooSlow(KpgError):
    """A subscription read too slowly and was dropped; subscribe again from `position`."""

    REASON = "SUBSCRIBER_TOO_SLOW"

    @property
    def position(self) -> str | None:
        """The position to resume the subscription from, if the gateway said."""
        return self.metadata.get("position") or None


_BY_REASON: dict[str, type[KpgError]] = {
    cls.REASON: cls
    for cls in (
        BackendUnavailable,
        ReplyTimeout,
        ReadModelBehind,
        InvalidArgument,
        PayloadTooLarge,
        WrongExpectedVersion,
        IdempotencyKeyReused,
        IdempotencyKeyInFlight,
        NotFound,
        TopicNotAllowed,
        Unauthenticated,
        RateLimited,
        SubscriberTooSlow,
    )
}
_BY_CODE: dict[grpc.StatusCode, type[KpgError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
