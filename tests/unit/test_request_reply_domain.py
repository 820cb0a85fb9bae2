"""What a caller may send through request-reply, and the deployment's reply names (pure: no I/O)."""

from __future__ import annotations

import json

import pytest

from gateway.domain.request_reply import (
    ProtectedTopics,
    Reply,
    ReplyStatus,
    Request,
    RequestLimits,
    header_name_problem,
    record_bytes,
    reply_names,
    request_headers,
    validate_request,
)
from gateway.errors import InvalidArgument, PayloadTooLarge, Reason, TopicNotAllowed

LIMITS = RequestLimits(max_bytes=100, max_timeout_ms=60_000)


def _request(**changes: object) -> Request:
    fields: dict[str, object] = {
        "topic": "pricing.quotes",
        "key": b"",
        "payload": b"",
        "headers": {},
        "timeout_ms": 0,
        "correlation_id": "c-1",
    }
    fields.update(changes)
    return Request(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "ce_type",
        "ce_id",
        "CE_source",
        "Ce_Subject",
        "content-type",
        "Content-Type",
        "CONTENT-TYPE",
        "kpg-reply-topic",
        "KPG-Correlation-Id",
        "kafka_replyTopic",
        "Kafka_CorrelationId",
    ],
)
def test_event_and_gateway_headers_are_refused_in_any_case(name: str) -> None:
    assert header_name_problem(name) is not None
    with pytest.raises(InvalidArgument) as raised:
        validate_request(_request(headers={name: "forged"}), LIMITS)
    assert raised.value.reason is Reason.INVALID_ARGUMENT
    assert [v.field for v in raised.value.violations] == [f"headers[{name}]"]


@pytest.mark.parametrize("name", ["", "tab\there", "new\nline", "nul\x00", "bell\x07"])
def test_empty_and_unprintable_header_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_request(_request(headers={name: "v"}), LIMITS)
    (violation,) = raised.value.violations
    assert violation.field.startswith("headers[") and "printable" in violation.description
    assert violation.field.isprintable()  # the field names the header escaped


@pytest.mark.parametrize("name", ["x-trace", "content-length", "cex", "traceparent", "kpg", "Ünïcode"])
def test_ordinary_header_names_are_allowed(name: str) -> None:
    assert header_name_problem(name) is None
    validate_request(_request(headers={name: "v"}), LIMITS)


def test_the_size_limit_counts_key_payload_and_every_header_name_and_value() -> None:
    assert record_bytes(_request(key=b"k" * 10, payload=b"p" * 20, headers={"ab": "cde", "é": "ü"})) == 39
    validate_request(_request(payload=b"p" * 90, headers={"abcde": "fghij"}), LIMITS)  # exactly 100
    with pytest.raises(PayloadTooLarge):
        validate_request(_request(payload=b"p" * 90, headers={"abcde": "fghijk"}), LIMITS)  # 101
    with pytest.raises(PayloadTooLarge):
        validate_request(_request(headers={"h": "v" * 100}), LIMITS)  # headers alone


def test_other_request_rules() -> None:
    with pytest.raises(InvalidArgument, match="topic"):
        validate_request(_request(topic=""), LIMITS)
    with pytest.raises(InvalidArgument, match="timeout_ms"):
        validate_request(_request(timeout_ms=60_001), LIMITS)
    for correlation_id in ("", "x" * 201, "a\nb"):
        with pytest.raises(InvalidArgument, match="correlation_id"):
            validate_request(_request(correlation_id=correlation_id), LIMITS)
    validate_request(_request(timeout_ms=60_000, correlation_id="x" * 200), LIMITS)


@pytest.mark.parametrize(
    "topic",
    [
        "orders.events",  # a declared category's default topic
        "billing-log",  # a declared category's own topic
        "kpg.replies",
        "kpg.replies.0123abcd",
        "kpg.anything",
        "__consumer_offsets",
        "_schemas",
        "pricing.quotes.DLT",
        "orders.events.DLT",
        "my.replies",  # the deployment's reply topic
    ],
)
def test_event_internal_dead_letter_and_reply_topics_are_protected(topic: str) -> None:
    protected = ProtectedTopics(frozenset({"orders.events", "billing-log"}), reply_topic="my.replies")
    assert protected.why_refused(topic) is not None
    with pytest.raises(TopicNotAllowed) as raised:
        protected.check(topic)
    assert raised.value.reason is Reason.TOPIC_NOT_ALLOWED and raised.value.metadata == {"topic": topic}


def test_with_undeclared_categories_every_events_topic_is_protected() -> None:
    declared_only = ProtectedTopics(frozenset({"orders.events"}))
    assert declared_only.why_refused("payments.events") is None
    any_category = ProtectedTopics(frozenset({"orders.events"}), any_events=True)
    assert any_category.why_refused("payments.events") is not None
    assert any_category.why_refused("orders.events") is not None


@pytest.mark.parametrize(
    "topic", ["pricing.quotes", "inventory.requests", "events", "orders.eventsx", "x.dlt", "mykpg.x", "a_b"]
)
def test_ordinary_topics_are_not_protected(topic: str) -> None:
    protected = ProtectedTopics(frozenset({"orders.events"}), any_events=True, reply_topic="kpg.replies.1")
    assert protected.why_refused(topic) is None
    protected.check(topic)


def test_reply_names_are_the_deployments_own() -> None:
    assert reply_names("0123abcd") == ("kpg.replies.0123abcd", "kpg-replies-0123abcd")
    assert reply_names("a") != reply_names("b")
    for bad in ("", "has space", "dot.ted", "x" * 65, "abc\n"):
        with pytest.raises(ValueError, match="deployment id"):
            reply_names(bad)


def test_request_headers_carry_the_callers_headers_and_the_plumbing() -> None:
    headers = request_headers(_request(headers={"x-trace": "t"}), reply_topic="kpg.replies.1", deadline_ms=42)
    assert headers == [
        ("x-trace", b"t"),
        ("kpg-correlation-id", b"c-1"),
        ("kpg-reply-topic", b"kpg.replies.1"),
        ("kpg-deadline", b"42"),
        ("kafka_correlationId", b"c-1"),
        ("kafka_replyTopic", b"kpg.replies.1"),
    ]


def test_a_stored_reply_keeps_when_it_was_written_and_consumed() -> None:
    reply = Reply("c-1", ReplyStatus.REPLIED, b"\x00ok", {"h": "v"}, "replies", 2, 7, False, 1_000, 1_004)
    assert Reply.decode(reply.encode()) == reply
    # A reply stored by a gateway from before these were kept still decodes (its legs are not known).
    old = json.loads(reply.encode())
    del old["replied_at_ms"], old["consumed_at_ms"]
    decoded = Reply.decode(json.dumps(old).encode())
    assert (decoded.replied_at_ms, decoded.consumed_at_ms, decoded.payload) == (0, 0, b"\x00ok")
