# Generated from aio.py by scripts/unasync_client.py (make gen). Do not edit: edit aio.py.
"""`Client`: the typed blocking client, the same calls as `kpg.AsyncClient` on grpc's sync API. Every
method takes and returns plain Python values (`kpg.models`), raises `kpg.KpgError` subclasses, retries
what is safe to retry and keeps to a deadline."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kpg import _calls as calls
from kpg._retry import Attempts
from kpg._settings import MetadataLike, Settings, Tls
from kpg.errors import KpgError
from kpg.models import (
    AppendResult,
    DeadLetter,
    DeadLetterPage,
    DeadLetterState,
    DeadLetterTopic,
    Document,
    Event,
    ExpectedState,
    QueryResult,
    ReadModelStatus,
    RecordedEvent,
    Reply,
    ReprocessResult,
    Saga,
    SagaPage,
    SagaStatus,
    StreamSlice,
)
from kpg.streams import ServerStream

__all__ = ["Client"]

P = TypeVar("P", bound=Message)
R = TypeVar("R")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class Client:
    """The gateway's typed blocking client; one channel, used as `with Client(target) as kpg:`. Safe to share
    between threads.

    - `tls`: None (plaintext), True (TLS with the system's root certificates) or `grpc.ChannelCredentials`.
    - `token`: sent on every call as `authorization: Bearer <token>`; `metadata`: more headers for every call.
    - `timeout`: each call's overall deadline in seconds, retries included (None: none); a call asking the
      gateway to wait (`min_position`, `timeout_ms`, `wait_timeout_ms`) gets at least that wait plus 2 s.
      Every method also takes `timeout=` for itself; `subscribe` and `watch_saga` have none unless given.
    - `retries`: how often a call failing UNAVAILABLE, RATE_LIMITED or IDEMPOTENCY_KEY_IN_FLIGHT is tried
      again, after exponential backoff from `initial_backoff` to `max_backoff` seconds, with jitter (at least
      the gateway's `retry_after_ms`). Writes carry an idempotency key (one is generated when none is given),
      so a retry never writes twice; writes without one (reprocess, discard, rebuild) are never retried.
    - `options`: grpc channel options, e.g. `[("grpc.max_receive_message_length", 64 << 20)]`.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: Tls = None,
        token: str | None = None,
        metadata: MetadataLike = None,
        timeout: float | None = 30.0,
        retries: int = 3,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self.target = target
        self._settings = Settings.build(
            tls=tls,
            token=token,
            metadata=metadata,
            timeout=timeout,
            retries=retries,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
        )
        credentials = self._settings.credentials
        self.channel: grpc.Channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )

    def close(self) -> None:
        """Close the channel, cancelling the calls still running."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- sending -------------------------------------------------------------------------------------------

    def _unary(self, call: calls.Unary[P, R], timeout: float | None) -> R:
        rpc = self.channel.unary_unary(call.method, _serialize, call.response_type.FromString)
        attempts = Attempts(
            self._settings.policy,
            self._settings.unary_timeout(timeout, call.server_wait),
            safe_to_retry=call.safe_to_retry,
        )
        while True:
            try:
                response = rpc(call.request, timeout=attempts.remaining(), metadata=self._settings.metadata)
            except grpc.RpcError as exc:
                error = KpgError.from_rpc_error(exc)
                pause = attempts.pause_after(error)
                if pause is None:
                    raise error from exc
            else:
                return call.convert(response)
            time.sleep(pause)

    def _follow(self, call: calls.Streaming[P, R], timeout: float | None) -> Generator[R, None, None]:
        rpc = self.channel.unary_stream(call.method, _serialize, call.response_type.FromString)
        attempts = Attempts(self._settings.policy, timeout, safe_to_retry=True)
        request = call.request
        while True:
            stream = rpc(request, timeout=attempts.remaining(), metadata=self._settings.metadata)
            try:
                for message in stream:
                    item = call.convert(message)
                    attempts.succeeded()
                    if call.resume is not None:
                        request = call.resume(item)
                    yield item
                    if call.is_last(item):
                        return
                return
            except grpc.RpcError as exc:
                error = KpgError.from_rpc_error(exc)
                pause = attempts.pause_after(error)
                if pause is None:
                    raise error from exc
            finally:
                stream.cancel()
            time.sleep(pause)

    def _stream(self, call: calls.Streaming[P, R], timeout: float | None) -> ServerStream[R]:
        return ServerStream(self._follow(call, timeout))

    # --- event store ---------------------------------------------------------------------------------------

    def append(
        self,
        category: str,
        stream_id: str,
        events: Event | Iterable[Event],
        *,
        expected_version: int | None = None,
        expected_state: ExpectedState | str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        timeout: float | None = None,
    ) -> AppendResult:
        """Append events to a stream, atomically, if the expectation holds: `expected_version` (the exact
        head version; 0: the stream must not exist) or `expected_state`; neither means any state.

        Raises `WrongExpectedVersion` (`.actual` is the head version), `NotFound` (undeclared category),
        `PayloadTooLarge`, `InvalidArgument`. Without `idempotency_key` one is generated, so retries
        never append twice; with the same key again the first answer comes back with `duplicate=True`."""
        return self._unary(
            calls.append(
                category,
                stream_id,
                events,
                expected_version=expected_version,
                expected_state=expected_state,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
                causation_id=causation_id,
            ),
            timeout,
        )

    def read_stream(
        self,
        category: str,
        stream_id: str,
        *,
        from_version: int = 0,
        max_count: int = 0,
        backwards: bool = False,
        min_position: str | None = None,
        wait_timeout_ms: int = 0,
        timeout: float | None = None,
    ) -> StreamSlice:
        """Read a stream's events from `from_version` (0: the first, or the head when `backwards`), at most
        `max_count` (0: the gateway's default). `min_position` (an append's position) waits up to
        `wait_timeout_ms` (0: 5 s) for the stream index to have it, else raises `ReadModelBehind`."""
        return self._unary(
            calls.read_stream(
                category,
                stream_id,
                from_version=from_version,
                max_count=max_count,
                backwards=backwards,
                min_position=min_position,
                wait_timeout_ms=wait_timeout_ms,
            ),
            timeout,
        )

    def subscribe(
        self,
        category: str,
        stream_id: str | None = None,
        *,
        from_version: int | None = None,
        from_position: str | None = None,
        timeout: float | None = None,
    ) -> ServerStream[RecordedEvent]:
        """Events of one stream (or, without `stream_id`, of the whole category): the stored ones from
        `from_version` or after `from_position` (neither: from the beginning), then new ones as they are
        appended; it never ends by itself. `for event in kpg.subscribe("orders"):`.

        After UNAVAILABLE it reconnects after the last event it delivered. `SubscriberTooSlow` (the gateway
        dropped a reader that fell behind) carries the `position` to subscribe again from."""
        return self._stream(
            calls.subscribe(category, stream_id, from_version=from_version, from_position=from_position),
            timeout,
        )

    # --- read models ---------------------------------------------------------------------------------------

    def get(
        self,
        read_model: str,
        key: str,
        *,
        min_position: str | None = None,
        wait_timeout_ms: int = 0,
        timeout: float | None = None,
    ) -> Document:
        """One document of a read model. With `min_position` (an append's position) it first waits up to
        `wait_timeout_ms` (0: 5 s) until the model has applied it (read your own write), else raises
        `ReadModelBehind`. Raises `NotFound` for an unknown read model or key."""
        return self._unary(
            calls.get(read_model, key, min_position=min_position, wait_timeout_ms=wait_timeout_ms), timeout
        )

    def query(
        self,
        read_model: str,
        filters: calls.Filters | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 0,
        page_token: str | None = None,
        min_position: str | None = None,
        wait_timeout_ms: int = 0,
        timeout: float | None = None,
    ) -> QueryResult:
        """One page of the documents matching every filter: a mapping (`{"status": "PLACED"}`, equality) or
        `Filter`s / (field, op, value) tuples (`[("total", ">=", 40)]`). `order_by` is a dotted field (none:
        by key); pass the result's `next_page_token` as `page_token` for the next page."""
        return self._unary(
            calls.query(
                read_model,
                filters,
                order_by=order_by,
                descending=descending,
                limit=limit,
                page_token=page_token,
                min_position=min_position,
                wait_timeout_ms=wait_timeout_ms,
            ),
            timeout,
        )

    def read_model_status(self, read_model: str, *, timeout: float | None = None) -> ReadModelStatus:
        """A read model's state, position, lag and document count."""
        return self._unary(calls.read_model_status(read_model), timeout)

    def list_read_models(self, *, timeout: float | None = None) -> list[ReadModelStatus]:
        """The status of every read model of the definitions file."""
        return self._unary(calls.list_read_models(), timeout)

    def rebuild_read_model(self, read_model: str, *, timeout: float | None = None) -> ReadModelStatus:
        """Replay the category into a fresh model, swapped in once it has caught up (never retried)."""
        return self._unary(calls.rebuild_read_model(read_model), timeout)

    # --- sagas ---------------------------------------------------------------------------------------------

    def start_saga(
        self,
        saga_type: str,
        input: Mapping[str, Any],
        *,
        saga_id: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> Saga:
        """Start a saga of a declared type (else `NotFound`) with `input` for its steps; returns its first
        snapshot. Without `idempotency_key` one is generated, so retries never start it twice."""
        return self._unary(
            calls.start_saga(
                saga_type,
                input,
                saga_id=saga_id,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
            ),
            timeout,
        )

    def get_saga(self, saga_id: str, *, timeout: float | None = None) -> Saga:
        """A saga's current snapshot; `NotFound` if unknown."""
        return self._unary(calls.get_saga(saga_id), timeout)

    def list_sagas(
        self,
        *,
        saga_type: str | None = None,
        status: SagaStatus | str | None = None,
        limit: int = 0,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> SagaPage:
        """One page of sagas, optionally of one type and status."""
        return self._unary(
            calls.list_sagas(saga_type=saga_type, status=status, limit=limit, page_token=page_token), timeout
        )

    def watch_saga(self, saga_id: str, *, timeout: float | None = None) -> ServerStream[Saga]:
        """A saga's snapshots: the current one, then every change, ending after a final status
        (`saga.status.is_final`: COMPLETED, COMPENSATED or FAILED). Reconnects after UNAVAILABLE."""
        return self._stream(calls.watch_saga(saga_id), timeout)

    # --- request-reply -------------------------------------------------------------------------------------

    def request(
        self,
        topic: str,
        payload: calls.Payload,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_ms: int = 0,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Send a request to an allowed topic and wait up to `timeout_ms` (0: the gateway's default) for its
        reply. `payload`: bytes, a str (UTF-8) or a JSON value. Raises `ReplyTimeout`, `TopicNotAllowed`.
        Without `idempotency_key` one is generated, so a retry never sends the request twice."""
        return self._unary(
            calls.request(
                topic,
                payload,
                key=key,
                headers=headers,
                timeout_ms=timeout_ms,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
            ),
            timeout,
        )

    def submit_request(
        self,
        topic: str,
        payload: calls.Payload,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_ms: int = 0,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Send a request without waiting; returns the correlation id to pass to `get_reply`."""
        return self._unary(
            calls.submit_request(
                topic,
                payload,
                key=key,
                headers=headers,
                timeout_ms=timeout_ms,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
            ),
            timeout,
        )

    def get_reply(
        self, correlation_id: str, *, wait_timeout_ms: int = 0, timeout: float | None = None
    ) -> Reply:
        """The reply to a submitted request, waiting up to `wait_timeout_ms` for it (0: answer at once);
        its status is PENDING while none has arrived. `NotFound` if unknown or expired."""
        return self._unary(calls.get_reply(correlation_id, wait_timeout_ms=wait_timeout_ms), timeout)

    # --- dead letters --------------------------------------------------------------------------------------

    def list_dead_letter_topics(self, *, timeout: float | None = None) -> list[DeadLetterTopic]:
        """The topics ending in ".DLT", with their record counts."""
        return self._unary(calls.list_dead_letter_topics(), timeout)

    def list_dead_letters(
        self,
        dlt_topic: str,
        *,
        original_topic: str | None = None,
        error_class: str | None = None,
        key: str | bytes | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        state: DeadLetterState | str | None = None,
        limit: int = 0,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> DeadLetterPage:
        """One page of a DLT's records matching every filter given (`since` inclusive, `until` exclusive,
        on `failed_at`)."""
        return self._unary(
            calls.list_dead_letters(
                dlt_topic,
                original_topic=original_topic,
                error_class=error_class,
                key=key,
                since=since,
                until=until,
                state=state,
                limit=limit,
                page_token=page_token,
            ),
            timeout,
        )

    def get_dead_letter(
        self, dlt_topic: str, partition: int, offset: int, *, timeout: float | None = None
    ) -> DeadLetter:
        """One dead letter by its record coordinates; `NotFound` if absent."""
        return self._unary(calls.get_dead_letter(dlt_topic, partition, offset), timeout)

    def reprocess_dead_letters(
        self,
        dlt_topic: str,
        *,
        ids: str | Iterable[str] | None = None,
        original_topic: str | None = None,
        error_class: str | None = None,
        key: str | bytes | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        state: DeadLetterState | str | None = None,
        target_topic: str | None = None,
        dry_run: bool = False,
        force: bool = False,
        timeout: float | None = None,
    ) -> ReprocessResult:
        """Send dead letters back to their original topic (or `target_topic`): those in `ids`, or those
        matching the filters (neither: all). Each at most once unless `force`; `dry_run` only counts.
        Not retried (it has no idempotency key), except as a dry run."""
        return self._unary(
            calls.reprocess_dead_letters(
                dlt_topic,
                ids=ids,
                original_topic=original_topic,
                error_class=error_class,
                key=key,
                since=since,
                until=until,
                state=state,
                target_topic=target_topic,
                dry_run=dry_run,
                force=force,
            ),
            timeout,
        )

    def discard_dead_letters(
        self, dlt_topic: str, ids: str | Iterable[str], *, reason: str = "", timeout: float | None = None
    ) -> int:
        """Mark dead letters as discarded, with a `reason` for the audit trail; returns how many were newly
        discarded. Never retried."""
        return self._unary(calls.discard_dead_letters(dlt_topic, ids, reason=reason), timeout)
