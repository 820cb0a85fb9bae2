"""DLT reprocessing: list and inspect dead letters, replay them at most once, discard them.

- **Reading.** Dead-letter topics are read chunk by chunk and a page stops at its limit, so nothing ever
  holds a whole topic in memory. The three formats are read by domain/dead_letters.py.
- **State.** What operators did with each dead letter (REPROCESSED with a replay count, DISCARDED with a
  reason) is kept in the compacted topic `kpg.dlt.state`, keyed by dead-letter id (`DeadLetterStates`).
  Every instance reads it up to its last stable offset before answering, so all give the same answer.
- **At most once.** A Reprocess sends each chunk's replays and their new states in one Kafka transaction,
  so a replay is on Kafka exactly when its state says REPROCESSED. Writers of one DLT topic share one
  transactional.id: whoever initialises last fences the others and completes or aborts what they left
  open, and only then reads the states and sends. A caller killed half-way and run again replays only
  what is left; two callers at once never replay a record twice (one of them is fenced and retries).
- **Bounded.** A Reprocess by filters selects the records below the topic's end as it was when the call
  began, so replays that fail again (and come back to the DLT) are never picked up by the same call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter

from gateway.adapters.kafka import (
    KafkaAdmin,
    OutcomeUnknown,
    OutRecord,
    PartitionScanner,
    Record,
    RecordsRejected,
    TopicSpec,
    TransactionAborted,
    TransactionalProducer,
)
from gateway.domain.dead_letters import (
    NOT_RESOLVED,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterState,
    Resolution,
    dead_letter_id,
    is_dlt_topic,
    parse_dead_letter_id,
    read_dead_letter,
)
from gateway.domain.events import murmur2
from gateway.errors import BackendUnavailable, InvalidArgument, NotFound, TopicNotAllowed
from gateway.settings import DeadLettersSettings
from gateway.tasks import bounded

log = logging.getLogger(__name__)

REPROCESSED = Counter(
    "kpg_dead_letters_reprocessed_total",
    "Dead letters selected by Reprocess, by outcome (reprocessed, skipped, failed); dry runs not counted",
    ["dlt_topic", "outcome"],
)
DISCARDED = Counter("kpg_dead_letters_discarded_total", "Dead letters marked discarded", ["dlt_topic"])

TRANSACTION_ATTEMPTS = 3  # a fenced or aborted chunk is re-read and sent again at most this often


@dataclass(frozen=True, slots=True)
class DeadLetterTopic:
    topic: str
    partitions: int
    record_count: int  # records currently retained


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    dead_letters: list[DeadLetter]
    next_page_token: str  # empty on the last page


@dataclass(frozen=True, slots=True)
class ReprocessRequest:
    """Contract: ReprocessRequest. The selection is `ids` or `filters`, not both; neither selects all."""

    dlt_topic: str
    ids: Sequence[str] = ()
    filters: DeadLetterFilter = field(default_factory=DeadLetterFilter)
    target_topic: str = ""
    dry_run: bool = False
    force: bool = False


@dataclass(frozen=True, slots=True)
class ReprocessResult:
    selected: int = 0
    reprocessed: int = 0  # with dry_run: that would be
    skipped: int = 0  # already reprocessed or discarded
    failed: int = 0  # no allowed or existing target, or refused by Kafka


class DeadLetterStates:
    """The resolutions of every dead letter, from the compacted topic `kpg.dlt.state` (key: dead-letter id,
    value: a `Resolution`). `refresh()` reads what was committed since the last call; the map is only as
    recent as the last refresh, so callers refresh before they answer."""

    def __init__(self, admin: KafkaAdmin, scanner: PartitionScanner, *, topic: str, timeout_s: float) -> None:
        self.topic = topic
        self._admin = admin
        self._scanner = scanner
        self._timeout_s = timeout_s
        self._resolutions: dict[str, Resolution] = {}
        self._next: dict[int, int] = {}  # partition -> next offset to read
        self._lock = asyncio.Lock()

    def topics(self) -> list[TopicSpec]:
        # One partition: a refresh is one list-offsets call and, when something changed, one fetch.
        return [TopicSpec(self.topic, 1, {"cleanup.policy": "compact"})]

    async def refresh(self) -> None:
        """Read every state committed up to now (the last stable offset of each partition)."""
        async with self._lock:
            if not self._next:
                self._next = {p: low for p, (low, _) in (await self._admin.watermarks(self.topic)).items()}
            for partition, start in sorted(self._next.items()):
                end = await self._admin.end_offset(self.topic, partition, self._timeout_s)
                async with contextlib.aclosing(
                    self._scanner.scan(self.topic, partition, start, end, timeout_s=self._timeout_s)
                ) as chunks:
                    async for chunk in chunks:
                        for record in chunk:
                            self._learn(record)
                self._next[partition] = max(start, end)

    def _learn(self, record: Record) -> None:
        key = (record.key or b"").decode(errors="replace")
        resolution = Resolution.decode(record.value)
        if resolution is None:
            self._resolutions.pop(key, None)
        else:
            self._resolutions[key] = resolution

    def get(self, dead_letter: str) -> Resolution:
        return self._resolutions.get(dead_letter, NOT_RESOLVED)

    def learned(self, resolutions: dict[str, Resolution]) -> None:
        """States this instance has just committed (a refresh would read them back; this is sooner)."""
        self._resolutions.update(resolutions)

    def record(self, dead_letter: str, resolution: Resolution) -> OutRecord:
        return OutRecord(self.topic, 0, dead_letter.encode(), resolution.encode(), [])

    async def close(self) -> None:
        await self._scanner.close()


class DeadLetters:
    """The DeadLetters service (contract section 5)."""

    def __init__(
        self,
        *,
        settings: DeadLettersSettings,
        admin: KafkaAdmin,
        scanners: Callable[[], PartitionScanner],
        writers: Callable[[str], TransactionalProducer],
        replay_allowed: Callable[[str, str], bool],
    ) -> None:
        """`scanners()` makes a reader of DLT partitions (one per listing, one per Reprocess); `writers(id)`
        a transactional producer; `replay_allowed(dlt_topic, target)` says where replays may go."""
        self._settings = settings
        self._admin = admin
        self._scanners = scanners
        self._writers = writers
        self._replay_allowed = replay_allowed
        self._timeout_s = settings.scan_timeout_ms / 1000
        self._list_scanner = scanners()
        self.states = DeadLetterStates(
            admin, scanners(), topic=settings.state_topic, timeout_s=self._timeout_s
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._producers: dict[str, TransactionalProducer] = {}

    def topics(self) -> list[TopicSpec]:
        return self.states.topics()

    async def stop(self, timeout_s: float) -> None:
        producers, self._producers = list(self._producers.values()), {}
        for producer in producers:
            await bounded(producer.close(), timeout_s, what="closing a dead-letter writer")
        await self._list_scanner.close()
        await self.states.close()

    # --- Reading --------------------------------------------------------------------------------------

    async def list_topics(self) -> list[DeadLetterTopic]:
        """Every topic ending in `.DLT`, by name, with the records it retains."""
        dlts = {t: n for t, n in (await self._admin.list_topics()).items() if is_dlt_topic(t)}
        counts = await self._admin.record_counts(dlts)
        return [DeadLetterTopic(topic, dlts[topic], counts[topic]) for topic in sorted(dlts)]

    async def list_dead_letters(
        self, dlt_topic: str, filters: DeadLetterFilter, *, limit: int = 0, page_token: str = ""
    ) -> DeadLetterPage:
        """The dead letters of `dlt_topic` that match, by partition then offset, at most `limit` per page."""
        if limit > self._settings.list_max_limit:
            raise InvalidArgument.field("limit", f"must be at most {self._settings.list_max_limit}")
        limit = limit or self._settings.list_default_limit
        marks = await self._watermarks(dlt_topic)
        after = _decode_token(page_token) if page_token else (min(marks), 0)
        await self.states.refresh()
        found: list[DeadLetter] = []
        ranges = {
            p: (max(low, after[1]) if p == after[0] else low, high)
            for p, (low, high) in marks.items()
            if p >= after[0]
        }
        size = 0
        # Closed on an early return too: the scanner is locked until its scan ends.
        async with contextlib.aclosing(self._read(self._list_scanner, dlt_topic, ranges)) as letters:
            async for letter in letters:
                if filters.matches(letter):
                    size += letter.size
                    if found and size > self._settings.page_max_bytes:  # the next page starts with it
                        return DeadLetterPage(found, _encode_token(letter.partition, letter.offset))
                    found.append(letter)
                    if len(found) == limit:
                        return DeadLetterPage(found, _encode_token(letter.partition, letter.offset + 1))
        return DeadLetterPage(found, "")

    async def get(self, dlt_topic: str, partition: int, offset: int) -> DeadLetter:
        marks = await self._watermarks(dlt_topic)
        low, high = marks.get(partition, (0, 0))
        if partition in marks and low <= offset < high:
            await self.states.refresh()
            ranges = {partition: (offset, offset + 1)}
            async with contextlib.aclosing(self._read(self._list_scanner, dlt_topic, ranges)) as letters:
                async for letter in letters:
                    return letter
        raise NotFound(
            f"no dead letter at {dlt_topic}[{partition}]@{offset}",
            metadata={"dlt_topic": dlt_topic, "partition": str(partition), "offset": str(offset)},
        )

    async def _read(
        self,
        scanner: PartitionScanner,
        dlt_topic: str,
        ranges: dict[int, tuple[int, int]],
        wanted: Callable[[int, int], bool] | None = None,
    ) -> AsyncGenerator[DeadLetter, None]:
        """The dead letters at offsets [start, end) of each partition, by partition then offset, with their
        resolutions as last refreshed; `wanted(partition, offset)` skips records before they are parsed."""
        for partition in sorted(ranges):
            start, end = ranges[partition]
            async with contextlib.aclosing(
                scanner.scan(dlt_topic, partition, start, end, timeout_s=self._timeout_s)
            ) as chunks:
                async for chunk in chunks:
                    for record in chunk:
                        if wanted is None or wanted(record.partition, record.offset):
                            yield _letter(
                                record, self.states.get(dead_letter_id(dlt_topic, partition, record.offset))
                            )

    async def _watermarks(self, dlt_topic: str) -> dict[int, tuple[int, int]]:
        if not is_dlt_topic(dlt_topic):
            raise InvalidArgument.field("dlt_topic", "must name a dead-letter topic (ending in .DLT)")
        if await self._admin.partitions(dlt_topic) is None:
            raise NotFound(f"no dead-letter topic {dlt_topic!r}", metadata={"dlt_topic": dlt_topic})
        return await self._admin.watermarks(dlt_topic)

    # --- Reprocess ------------------------------------------------------------------------------------

    async def reprocess(self, request: ReprocessRequest) -> ReprocessResult:
        """Send the selected dead letters back (see the module docstring for the guarantees)."""
        dlt = request.dlt_topic
        if request.ids and request.filters != DeadLetterFilter():
            raise InvalidArgument.field("ids", "select by ids or by filters, not both")
        marks = await self._watermarks(dlt)
        ranges, ids = self._selection(dlt, request.ids, marks)
        if request.target_topic:
            if not self._replay_allowed(dlt, request.target_topic):
                raise TopicNotAllowed(
                    f"dead letters of {dlt} may not be reprocessed to {request.target_topic!r}",
                    metadata={"dlt_topic": dlt, "target_topic": request.target_topic},
                )
            if await self._admin.partitions(request.target_topic) is None:
                raise NotFound(
                    f"no topic {request.target_topic!r}", metadata={"target_topic": request.target_topic}
                )
        wanted = None if ids is None else (lambda p, o: (p, o) in ids)
        run = _Run(self, request)
        async with self._exclusive(dlt):
            if not request.dry_run:
                await self._writer(dlt)  # fences any other writer first: then the states are complete
            await self.states.refresh()
            scanner = self._scanners()  # its own: a long Reprocess never holds up listings
            try:
                batch: list[DeadLetter] = []
                async with contextlib.aclosing(self._read(scanner, dlt, ranges, wanted)) as letters:
                    async for letter in letters:
                        if request.filters.matches(letter):
                            batch.append(letter)
                            if len(batch) >= self._settings.batch_size:
                                await run.send(batch)
                                batch = []
                await run.send(batch)
            finally:
                await scanner.close()
        if ids is not None and run.selected < len(ids):
            run.failed += len(ids) - run.selected  # ids at offsets holding no record (transaction markers)
            run.selected = len(ids)
        result = run.result()
        if not request.dry_run:
            for outcome in ("reprocessed", "skipped", "failed"):
                REPROCESSED.labels(dlt, outcome).inc(getattr(result, outcome))
        return result

    def _selection(
        self, dlt: str, ids: Sequence[str], marks: dict[int, tuple[int, int]]
    ) -> tuple[dict[int, tuple[int, int]], set[tuple[int, int]] | None]:
        """The offset ranges to read, and the (partition, offset) pairs wanted when selecting by ids. Ids
        outside the topic's retained records fail the call before anything is sent."""
        if not ids:
            return {p: (low, high) for p, (low, high) in marks.items() if high > low}, None
        wanted = self._positions(dlt, ids, marks)
        ranges: dict[int, tuple[int, int]] = {}
        for partition, offset in wanted:
            low, high = ranges.get(partition, (offset, offset + 1))
            ranges[partition] = (min(low, offset), max(high, offset + 1))
        return ranges, wanted

    def _positions(
        self, dlt: str, ids: Sequence[str], marks: dict[int, tuple[int, int]]
    ) -> set[tuple[int, int]]:
        if len(ids) > self._settings.max_ids:
            raise InvalidArgument.field("ids", f"at most {self._settings.max_ids} per call")
        positions = set()
        missing = []
        for value in ids:
            parsed = parse_dead_letter_id(value)
            if parsed is None or parsed[0] != dlt:
                raise InvalidArgument.field("ids", f"{value!r} is not the id of a dead letter of {dlt}")
            _, partition, offset = parsed
            low, high = marks.get(partition, (0, 0))
            if not low <= offset < high:
                missing.append(value)
            positions.add((partition, offset))
        if missing:
            raise NotFound(
                f"no dead letter {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                metadata={"dlt_topic": dlt, "id": missing[0]},
            )
        return positions

    # --- Discard --------------------------------------------------------------------------------------

    async def discard(self, dlt_topic: str, ids: Sequence[str], reason: str) -> int:
        """Mark the dead letters discarded (with `reason`); returns how many were not discarded before."""
        if not ids:
            raise InvalidArgument.field("ids", "name at least one dead letter to discard")
        if not reason.strip():
            raise InvalidArgument.field("reason", "say why the dead letters are discarded")
        marks = await self._watermarks(dlt_topic)
        positions = self._positions(dlt_topic, ids, marks)
        letters = [dead_letter_id(dlt_topic, p, o) for p, o in sorted(positions)]
        discarded = 0
        async with self._exclusive(dlt_topic):
            for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
                writer = await self._writer(dlt_topic)
                await self.states.refresh()
                now_ms = int(time.time() * 1000)
                changes = {
                    letter: self.states.get(letter).discarded(reason, now_ms)
                    for letter in letters
                    if self.states.get(letter).state is not DeadLetterState.DISCARDED
                }
                if not changes:
                    break
                try:
                    await writer.send(
                        [self.states.record(letter, r) for letter, r in changes.items()], self._timeout_s
                    )
                except (TransactionAborted, OutcomeUnknown, BackendUnavailable) as exc:
                    await self._drop_writer(dlt_topic, writer)
                    if attempt == TRANSACTION_ATTEMPTS:
                        raise
                    log.warning("discarding from %s: %s; trying again", dlt_topic, exc)
                    continue
                self.states.learned(changes)
                discarded = len(changes)
                break
        DISCARDED.labels(dlt_topic).inc(discarded)
        return discarded

    # --- Writers --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, dlt_topic: str) -> AsyncIterator[None]:
        """One Reprocess or Discard of a DLT topic at a time in this process (other processes are fenced
        by the transactional.id); the topic's writer lives as long as the call."""
        async with self._locks.setdefault(dlt_topic, asyncio.Lock()):
            try:
                yield
            finally:
                writer = self._producers.pop(dlt_topic, None)
                if writer is not None:
                    await bounded(writer.close(), self._timeout_s, what=f"closing the writer of {dlt_topic}")

    async def _writer(self, dlt_topic: str) -> TransactionalProducer:
        """This DLT topic's transactional producer, initialised (which fences any other instance's)."""
        writer = self._producers.get(dlt_topic)
        if writer is None or not writer.usable:
            writer = self._writers(f"kpg-dlt-{dlt_topic}")
            await writer.init(self._timeout_s)
            self._producers[dlt_topic] = writer
        return writer

    async def _drop_writer(self, dlt_topic: str, writer: TransactionalProducer) -> None:
        """Forget a writer after a failed transaction: the next one initialises afresh, which completes or
        aborts whatever this one left open, so re-reading the states afterwards shows what is on Kafka."""
        if self._producers.get(dlt_topic) is writer:
            del self._producers[dlt_topic]
        await bounded(writer.close(), self._timeout_s, what=f"closing a failed writer of {dlt_topic}")

    async def _partitions(self, topic: str, cache: dict[str, int | None]) -> int | None:
        if topic not in cache:
            cache[topic] = await self._admin.partitions(topic)
        return cache[topic]


class _Run:
    """One Reprocess call: its counts, and sending one chunk of selected dead letters at a time."""

    def __init__(self, service: DeadLetters, request: ReprocessRequest) -> None:
        self._service = service
        self._request = request
        self._partitions: dict[str, int | None] = {}
        self.selected = self.reprocessed = self.skipped = self.failed = 0

    def result(self) -> ReprocessResult:
        return ReprocessResult(self.selected, self.reprocessed, self.skipped, self.failed)

    async def send(self, letters: list[DeadLetter]) -> None:
        """Replay the chunk's letters that are due, with their new states, in one transaction. After a
        failed transaction the states are re-read under a new writer: a letter whose state changed since it
        was read is not sent again (reprocessed if the change is the one this call wrote, else skipped)."""
        if not letters:
            return
        self.selected += len(letters)
        service, request, dlt = self._service, self._request, self._request.dlt_topic
        states = service.states
        intended: dict[str, Resolution] = {}
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            due = []
            for letter in letters:
                now = states.get(letter.id)
                if now != letter.resolution:
                    if intended.get(letter.id) == now:
                        self.reprocessed += 1  # an earlier attempt's commit did land
                    else:
                        self.skipped += 1  # another caller reprocessed or discarded it meanwhile
                elif request.force or letter.state is DeadLetterState.NEW:
                    due.append(letter)
                else:
                    self.skipped += 1
            routed = [r for r in [await self._route(letter) for letter in due] if r is not None]
            self.failed += len(due) - len(routed)
            if request.dry_run or not routed:
                self.reprocessed += len(routed)
                return
            writer = await service._writer(dlt)
            now_ms = int(time.time() * 1000)
            intended = {letter.id: letter.resolution.replayed(target, now_ms) for letter, target, _ in routed}
            out = []
            for letter, target, partition in routed:
                payload, headers = letter.replay(target)
                out.append(OutRecord(target, partition, letter.key, payload, headers))
            out += [states.record(letter_id, r) for letter_id, r in intended.items()]
            try:
                await writer.send(out, service._timeout_s)
            except RecordsRejected as rejected:
                # Nothing was written: the refused replays fail, the others go in the next attempt.
                refused = {
                    routed[i][0].id: error for i, error in rejected.rejected.items() if i < len(routed)
                }
                for letter_id, error in sorted(refused.items()):
                    log.warning("dead letter %s not reprocessed: %s", letter_id, error)
                self.failed += len(refused)
                letters = [letter for letter, _, _ in routed if letter.id not in refused]
                intended = {}
                continue
            except (TransactionAborted, OutcomeUnknown, BackendUnavailable) as exc:
                await service._drop_writer(dlt, writer)
                if attempt == TRANSACTION_ATTEMPTS:
                    raise
                log.warning("reprocessing from %s: %s; re-reading the states and trying again", dlt, exc)
                await service._writer(dlt)
                await states.refresh()
                letters = [letter for letter, _, _ in routed]
                continue
            states.learned(intended)
            self.reprocessed += len(routed)
            return
        raise BackendUnavailable(f"reprocessing from {dlt}: a chunk failed {TRANSACTION_ATTEMPTS} times")

    async def _route(self, letter: DeadLetter) -> tuple[DeadLetter, str, int] | None:
        """(letter, target topic, partition), or None (logged) when it has nowhere allowed to go."""
        service, dlt = self._service, self._request.dlt_topic
        target = self._request.target_topic or letter.details.original_topic
        if not target:
            problem = "its original topic is unknown (give a target topic)"
        elif not service._replay_allowed(dlt, target):
            problem = f"{target!r} is not an allowed target (definitions: dead_letters.targets)"
        elif (partitions := await service._partitions(target, self._partitions)) is None:
            problem = f"topic {target!r} does not exist"
        else:
            return letter, target, _partition(letter, target, partitions)
        log.warning("dead letter %s not reprocessed: %s", letter.id, problem)
        return None


def _partition(letter: DeadLetter, target: str, partitions: int) -> int:
    """The original partition when going back to the original topic (keeps the key's order there, whatever
    partitioner wrote it), else the key's murmur2 partition as Kafka's Java clients choose it."""
    original = letter.details.original_partition
    if target == letter.details.original_topic and 0 <= original < partitions:
        return original
    if letter.key:
        return (murmur2(letter.key) & 0x7FFFFFFF) % partitions
    return 0


def _letter(record: Record, resolution: Resolution) -> DeadLetter:
    return DeadLetter(
        dlt_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        headers=tuple(record.headers),
        details=read_dead_letter(record.headers, record.value, timestamp_ms=record.timestamp_ms),
        resolution=resolution,
    )


def _encode_token(partition: int, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([partition, offset]).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, int]:
    try:
        partition, offset = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not (isinstance(partition, int) and isinstance(offset, int)) or partition < 0 or offset < 0:
            raise ValueError(token)
        return partition, offset
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a token this gateway returned") from None
