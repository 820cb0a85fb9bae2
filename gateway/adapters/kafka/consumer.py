"""`ConsumerRunner`: every consumer the gateway runs goes through here, with one failure policy.

The confluent-kafka consumer lives on one dedicated thread; the runner fetches batches with
`consume(n)`, awaits the async handler, and only then commits the batch's offsets (at-least-once,
never ahead of processing). Handlers must shrug off a redelivered record.

The failure policy (`FailurePolicy`), the same for every consumer:
- The runner never dies: whatever a handler or the driver raises, the loop goes on (cancellation aside).
- A backend outage (`BackendUnavailable`: Kafka, Redis or the database) rewinds to the first record not
  processed and backs off (doubling, capped at `max_outage_backoff_s`, short: each retry is only a probe,
  and a consumer must resume within about a second of its backend coming back); it never counts against
  a record and never skips one.
- Any other handler failure is retried with backoff; when the batch keeps failing, its records are
  handled one by one, and a record that still fails after `max_attempts` is given to `dead_letter`
  (which writes `<topic>.DLT`). Only once that write is acknowledged does the runner move past it;
  without a `dead_letter` the record is retried until it succeeds. While records are handled one by one
  (seconds each, with backoff and dead-letter writes: a batch of them can take minutes), the runner goes
  back to the consumer between records with every partition paused: rebalances are served and the member
  stays within max.poll.interval.ms, so one failing batch never holds up its whole group; a partition
  revoked meanwhile is left to its new owner (its remaining records are not handled here).
- A partition whose start offset cannot be read (the database is down) is assigned later, not dropped.
- A step that takes longer than `STEP_REPORT_S` (a fetch, a batch's handling, a commit) is logged with
  where it waits, never silently: at a rebalance the whole group waits for a member that does not come
  back to fetch, up to max.poll.interval.ms (5 minutes), and no partition of the group is consumed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Gauge

from gateway.adapters.kafka.config import consumer_config
from gateway.adapters.kafka.records import Record
from gateway.adapters.kafka.threads import consume_ready, on_client_thread
from gateway.errors import BackendUnavailable
from gateway.settings import KafkaSettings
from gateway.tasks import awaiting_stack, bounded, raise_if_cancelling, stop_task

log = logging.getLogger(__name__)

BatchHandler = Callable[[Sequence[Record]], Awaitable[None]]
TopicPartitionKey = tuple[str, int]
# Where to start each newly assigned partition, when the offsets live with the data (not in Kafka).
StartOffsets = Callable[[list[TopicPartitionKey]], dict[TopicPartitionKey, int]]
PositionsHandler = Callable[[dict[TopicPartitionKey, int]], Awaitable[None]]
# Writes one record that keeps failing to its dead-letter topic: (record, error, attempts, group id).
DeadLetter = Callable[[Record, BaseException, int, str], Awaitable[None]]

STEP_REPORT_S = 30.0

# Summed over the workers and instances of a deployment, a group's partitions held should equal its topics'
# partition count; less, for longer than a rebalance, means partitions nobody consumes.
ASSIGNED = Gauge(
    "kpg_consumer_assigned_partitions",
    "Partitions this consumer group's members hold, by group",
    ["group"],
    multiprocess_mode="livesum",
)


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    max_attempts: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_outage_backoff_s: float = 1.0
    dead_letter: DeadLetter | None = None

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1)))

    def outage_delay(self, outages: int) -> float:
        """The pause after the `outages`-th failure in a row to reach a backend (1-based)."""
        return min(self.max_outage_backoff_s, self.delay(outages))


class ConsumerRunner:
    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group_id: str,
        topics: Sequence[str],
        handler: BatchHandler,
        policy: FailurePolicy | None = None,
        batch_size: int = 500,
        poll_timeout_s: float = 0.2,
        linger_s: float = 0.0,
        synchronous_commit: bool = True,
        start_offsets: StartOffsets | None = None,
        on_positions: PositionsHandler | None = None,
        step_report_s: float = STEP_REPORT_S,
        **overrides: Any,
    ) -> None:
        self.group_id = group_id
        self.topics = list(topics)
        self._handler = handler
        self._policy = policy or FailurePolicy()
        self._batch_size = batch_size
        self._poll_timeout_s = poll_timeout_s
        # After the first record of a batch, wait this long for more (see consume_ready). None by default:
        # what arrives while a batch is handled makes the next batch, so batches grow with the load, and a
        # quiet moment's record is handled at once (a 50 ms linger was most of ReadStream-after-append).
        self._linger_s = linger_s
        # False: commit in the background (a lost commit means a redelivery, for handlers that shrug it off).
        self._synchronous_commit = synchronous_commit
        # With start_offsets the handler stores its offsets with its data, so Kafka commits are not used,
        # and on_positions is how the runner moves them (past transaction markers and dead letters).
        if start_offsets is not None and on_positions is None:
            raise ValueError("start_offsets needs on_positions to move stored offsets")
        self._start_offsets = start_offsets
        self._on_positions = on_positions
        self._positions: dict[TopicPartitionKey, int] = {}
        self._unstarted: set[TopicPartitionKey] = set()  # assigned, but their start offsets not known yet
        self._paused: set[TopicPartitionKey] = set()  # paused while a batch is handled record by record
        self._config = consumer_config(settings, group_id, **overrides)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-consumer-{group_id}")
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._step = ""  # what the loop is doing (see _watch), since _step_since (loop time)
        self._step_since = 0.0
        self._step_report_s = step_report_s
        self._stopping = False
        self.assignment: set[tuple[str, int]] = set()

    async def start(self) -> None:
        """Create the consumer, subscribe, and start consuming in the background. Idempotent."""
        if self._task is not None and not self._task.done():
            return
        if self._consumer is None:
            await self._call(self._open)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group_id}")
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name=f"consumer-watch:{self.group_id}")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the batch in hand (up to `timeout_s`, then cancel it), leave the group and close."""
        self._stopping = True
        task = self._task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)
            await stop_task(task, 2.0)
        await stop_task(self._watcher, 1.0)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await bounded(self._call(consumer.close), 5.0, what=f"closing consumer {self.group_id}")
        self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await on_client_thread(self._executor, f"Kafka consumer {self.group_id}", fn, *args)

    def _open(self) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    # Rebalance callbacks run on the consumer thread inside consume(); by then the previous batch is
    # processed and committed, so revoking loses nothing and hands over no uncommitted work.
    # With start_offsets, each callback (un)assigns explicitly, even nothing: a callback that does not is
    # done for by confluent-kafka, which assigns from Kafka's committed offsets (unused here: the partition
    # would be read again from the beginning) or unassigns partitions never assigned (an error that stalls
    # the rebalance).
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        self._record_rebalance(consumer, "assigned", partitions)
        if self._start_offsets is not None and partitions:
            self._unstarted |= {(tp.topic, tp.partition) for tp in partitions}
            self._assign_unstarted(consumer)

    def _record_rebalance(self, consumer: Consumer, change: str, partitions: list[TopicPartition]) -> None:
        """One line per rebalance step, as Spring Kafka logs them: which member holds what is the first thing
        to know about a group that stopped consuming (the broker's log tells the group's side)."""
        ASSIGNED.labels(self.group_id).set(len(self.assignment))
        log.info(
            "consumer %s: %s %s; now holds %s (member %s)",
            self.group_id,
            change,
            _partitions_text((tp.topic, tp.partition) for tp in partitions),
            _partitions_text(self.assignment),
            consumer.memberid(),
        )

    def _assign_unstarted(self, consumer: Consumer) -> None:
        """Assign the partitions whose start offsets can be read now; the others wait for the next try."""
        assert self._start_offsets is not None
        keys = sorted(self._unstarted)
        try:
            offsets = self._start_offsets(keys)
        except Exception as exc:  # on the consumer thread: an exception here would lose the assignment
            log.warning("consumer %s: start offsets unavailable (%s); assigning later", self.group_id, exc)
            consumer.incremental_assign([])  # none of them yet (see above)
            return
        self._unstarted.clear()
        consumer.incremental_assign(
            [TopicPartition(t, p, offsets.get((t, p), OFFSET_BEGINNING)) for t, p in keys]
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        if paused := revoked & self._paused:  # a pause outlives the assignment: assigned again, still paused
            consumer.resume([TopicPartition(t, p) for t, p in paused])
            self._paused -= paused
        self.assignment -= revoked
        self._record_rebalance(consumer, "revoked", partitions)
        for key in revoked:
            self._positions.pop(key, None)
        if self._start_offsets is not None and partitions:
            started = [tp for tp in partitions if (tp.topic, tp.partition) not in self._unstarted]
            self._unstarted -= revoked
            consumer.incremental_unassign(started)  # only those assigned, even none (see above)

    def _consume(self) -> list[Record]:
        assert self._consumer is not None
        if self._unstarted:
            self._assign_unstarted(self._consumer)
        messages = consume_ready(self._consumer, self._batch_size, self._poll_timeout_s, self._linger_s)
        records = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal():
                    raise KafkaException(error)
                log.warning("consumer %s: %s", self.group_id, error.str())
                continue
            records.append(to_record(message))
        return records

    def _serve_group(self) -> None:
        """Between records handled one by one: serve rebalance callbacks and the poll interval, consuming
        nothing (every assigned partition paused; a message of a partition just assigned is given back)."""
        assert self._consumer is not None
        unpaused = self.assignment - self._unstarted - self._paused
        if unpaused:
            self._consumer.pause([TopicPartition(t, p) for t, p in unpaused])
            self._paused |= unpaused
        given_back = [to_record(m) for m in self._consumer.consume(self._batch_size, 0) if m.error() is None]
        if given_back:
            self._rewind(given_back)

    def _resume(self) -> None:
        assert self._consumer is not None
        paused, self._paused = self._paused & self.assignment, set()
        if paused:
            self._consumer.resume([TopicPartition(t, p) for t, p in paused])

    def _changed_positions(self) -> dict[TopicPartitionKey, int]:
        """Positions that moved since last asked: past records, and past transaction markers too."""
        assert self._consumer is not None
        assigned = [TopicPartition(t, p) for t, p in self.assignment - self._unstarted]
        changed = {}
        for tp in self._consumer.position(assigned) if assigned else []:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0 and self._positions.get(key) != tp.offset:
                changed[key] = self._positions[key] = tp.offset
        return changed

    def _commit(self, records: Sequence[Record]) -> None:
        assert self._consumer is not None
        if self._start_offsets is not None:
            return
        offsets = {(r.topic, r.partition): r.offset + 1 for r in records}
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if self._synchronous_commit:
            self._consumer.commit(offsets=partitions, asynchronous=False)
        else:
            self._consumer.commit(offsets=partitions, asynchronous=True)

    def _rewind(self, records: Sequence[Record]) -> None:
        """Seek each partition back to its first record in `records`: they are delivered again."""
        assert self._consumer is not None
        first: dict[tuple[str, int], int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        for (topic, partition), offset in first.items():
            if (topic, partition) in self.assignment:
                self._consumer.seek(TopicPartition(topic, partition, offset))

    def _doing(self, step: str) -> None:
        self._step, self._step_since = step, asyncio.get_running_loop().time()

    async def _watch(self) -> None:
        """Log a step of `_run` that takes longer than `step_report_s`, with where it waits, once per step."""
        loop = asyncio.get_running_loop()
        report_s = self._step_report_s
        reported = 0.0
        while True:
            await asyncio.sleep(report_s / 6)
            task, since = self._task, self._step_since
            if task is None or task.done() or since == reported or loop.time() - since < report_s:
                continue
            reported = since
            log.error(
                "consumer %s: %s for %.0fs; none of the group's partitions is consumed at a rebalance until "
                "it ends. Waiting in:\n%s",
                self.group_id,
                self._step,
                loop.time() - since,
                awaiting_stack(task),
            )

    async def _run(self) -> None:
        outages = 0
        while not self._stopping:
            try:
                self._doing("fetching")
                records = await self._call(self._consume)
                if records:
                    self._doing(f"handling {len(records)} record(s)")
                    await self._handle(records)
                if self._on_positions is not None:
                    self._doing("moving positions")
                    changed = await self._call(self._changed_positions)
                    if changed:
                        await self._on_positions(changed)
                outages = 0
            except Exception as exc:  # never dies: an outage or a bug backs off and tries again
                raise_if_cancelling()
                outages += 1
                if isinstance(exc, BackendUnavailable):
                    log.error("consumer %s: %s; retrying", self.group_id, exc)
                else:
                    log.exception("consumer %s: unexpected failure; retrying", self.group_id)
                await asyncio.sleep(self._policy.outage_delay(outages))

    async def _handle(self, records: Sequence[Record]) -> None:
        """Process a batch under the failure policy (module doc). Raises BackendUnavailable after
        rewinding to the first record not processed."""
        policy = self._policy
        error: Exception | None = None
        for attempt in range(1, policy.max_attempts + 1):
            try:
                error = await self._try(records)
            except BaseException:
                await self._call(self._rewind, records)
                raise
            if error is None:
                return
            log.warning(
                "consumer %s: handler failed on %d record(s) (attempt %d): %r",
                self.group_id,
                len(records),
                attempt,
                error,
            )
            if attempt < policy.max_attempts:
                await asyncio.sleep(policy.delay(attempt))
        # The batch keeps failing: find the record(s) to blame by handling them one by one (a batch of
        # one has had its attempts already), serving the group in between (module doc).
        try:
            for i, record in enumerate(records):
                try:
                    if len(records) == 1:
                        await self._settle(record, policy.max_attempts, error)
                    else:
                        await self._settle(record, 0, None)
                except BaseException:
                    await self._call(self._rewind, records[i:])
                    raise
        finally:
            if self._consumer is not None and not self._stopping:
                await self._call(self._resume)

    async def _try(self, records: Sequence[Record]) -> Exception | None:
        """Handle and commit; the handler's error (None on success). Outages and cancellation raise."""
        try:
            await self._handler(records)
        except BackendUnavailable:
            raise_if_cancelling()
            raise
        except Exception as exc:
            raise_if_cancelling()
            return exc
        await self._call(self._commit, records)
        return None

    async def _settle(self, record: Record, tried: int, error: Exception | None) -> None:
        """One record: retried under the policy until it succeeds or, with a dead-letter writer, until
        `max_attempts` attempts failed; then dead-lettered and passed. Serves the group before each attempt;
        a record whose partition was revoked meanwhile is left to its new owner, which starts from the last
        commit."""
        policy = self._policy
        attempt = tried
        while error is None or attempt < policy.max_attempts or policy.dead_letter is None:
            if attempt:
                await asyncio.sleep(policy.delay(attempt))
            await self._call(self._serve_group)
            if (record.topic, record.partition) not in self.assignment:
                return
            attempt += 1
            error = await self._try([record])
            if error is None:
                return
            log.warning(
                "consumer %s: record %s[%d]@%d failed (attempt %d): %r",
                self.group_id,
                record.topic,
                record.partition,
                record.offset,
                attempt,
                error,
            )
        assert policy.dead_letter is not None
        log.error(
            "consumer %s: record %s[%d]@%d failed %d times; writing it to the dead-letter topic",
            self.group_id,
            record.topic,
            record.partition,
            record.offset,
            attempt,
        )
        # Acknowledged by Kafka (or this raises) before the offsets move past the record.
        await policy.dead_letter(record, error, attempt, self.group_id)
        if self._on_positions is not None and self._start_offsets is not None:
            await self._on_positions({(record.topic, record.partition): record.offset + 1})
        await self._call(self._commit, [record])


def _partitions_text(partitions: Iterable[TopicPartitionKey]) -> str:
    """`orders[0,1,4] replies[2]`, or `nothing`."""
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(partitions):
        by_topic.setdefault(topic, []).append(partition)
    return " ".join(f"{t}[{','.join(map(str, ps))}]" for t, ps in by_topic.items()) or "nothing"


def to_record(message: Message) -> Record:
    _, timestamp = message.timestamp()
    key = message.key()
    value = message.value()
    # A consumed message's headers are a list of (name, bytes) pairs, or None.
    raw_headers = cast("list[tuple[str, bytes | None]]", message.headers() or [])
    return Record(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=key.encode() if isinstance(key, str) else key,
        value=value.encode() if isinstance(value, str) else value,
        headers=tuple((name, header or b"") for name, header in raw_headers),
        timestamp_ms=timestamp if timestamp and timestamp > 0 else None,
    )
