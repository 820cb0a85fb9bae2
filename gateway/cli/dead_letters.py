"""`kpg dlt topics|list|show|reprocess|discard`: dead-letter topics from the command line, over gRPC.

The commands call kpg.v1.DeadLetters on a running gateway (`--target`, default `$KPG_TARGET` or
127.0.0.1:50051) through the Python client, like any other client. Tables go to stdout, progress and
errors to stderr; `--json` prints the answers' proto3 JSON instead of tables.

`reprocess` by filters collects first, then replays. It pages through ListDeadLetters to gather the ids
that match (only NEW ones unless `--force` or `--state`), and only then sends those ids to Reprocess in
batches of `--batch`. One Reprocess call never picks up what arrives while it runs, but a run is many
calls: replays that fail again land back in the same DLT meanwhile, and a run that sent the filters with
every batch would find them there and replay them again. A list of ids fixed beforehand cannot grow; it
also gives the progress bar its total.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from kpg.client import GatewayClient, error_details
from kpg.v1 import dead_letters_pb2 as pb
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 120.0
STATES = ("NEW", "REPROCESSED", "DISCARDED")
MESSAGE_WIDTH = 50  # error messages are cut to this in `list`; `show` prints them whole
UNBOUNDED = 1_000_000
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

Command = Callable[[GatewayClient, argparse.Namespace, "Ui"], Awaitable[int]]


# --- Arguments -----------------------------------------------------------------------------------------


def add_dlt_commands(commands: Any) -> None:
    """Register `kpg dlt` and its commands on the top-level subparsers."""
    dlt = commands.add_parser("dlt", allow_abbrev=False, help="inspect, reprocess and discard dead letters")
    _add_connection_options(dlt)
    dlt.set_defaults(
        func=run_dlt,
        target=os.environ.get("KPG_TARGET") or DEFAULT_TARGET,
        json=False,
        timeout=DEFAULT_TIMEOUT_S,
    )
    actions = dlt.add_subparsers(dest="action", required=True)

    def action(name: str, command: Command, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, allow_abbrev=False, help=help, description=command.__doc__
        )
        # Also accepted after the command; unset there, they keep what `kpg dlt` was given.
        _add_connection_options(parser, defaults=argparse.SUPPRESS)
        parser.set_defaults(run=command, parser=parser)
        return parser

    action("topics", topics, "the dead-letter topics with their record counts")

    listing = action("list", list_dead_letters, "the dead letters of a DLT topic, a page at a time")
    listing.add_argument("dlt_topic", metavar="DLT_TOPIC")
    _add_filters(listing)
    listing.add_argument("--limit", type=_positive(int), default=0, help="page size (default: the server's)")
    listing.add_argument("--page-token", default="", help="next page token of the previous page")
    listing.add_argument("--all", action="store_true", help="follow every page")

    show_parser = action("show", show, "every field of one dead letter")
    show_parser.add_argument(
        "id", type=_dead_letter_id, metavar="ID", help="<dlt_topic>:<partition>:<offset>"
    )

    replay = action("reprocess", reprocess, "send dead letters back to their topic")
    replay.add_argument("dlt_topic", metavar="DLT_TOPIC")
    replay.add_argument(
        "--id", dest="ids", action="append", default=[], metavar="ID", help="a dead letter (repeatable)"
    )
    _add_filters(replay)
    replay.add_argument("--target-topic", default="", help="send here instead of the original topic")
    replay.add_argument("--dry-run", action="store_true", help="count what would be sent, send nothing")
    replay.add_argument("--force", action="store_true", help="also replay reprocessed or discarded ones")
    replay.add_argument("--batch", type=_positive(int), default=500, help="ids per call (default 500)")

    drop = action("discard", discard, "mark dead letters as never to be reprocessed")
    drop.add_argument("dlt_topic", metavar="DLT_TOPIC")
    drop.add_argument(
        "--id", dest="ids", action="append", required=True, metavar="ID", help="a dead letter (repeatable)"
    )
    drop.add_argument("--reason", required=True, help="why, for the audit trail")


def _add_connection_options(parser: argparse.ArgumentParser, *, defaults: Any = None) -> None:
    parser.add_argument(
        "--target",
        default=defaults,
        help=f"gateway gRPC address (default: $KPG_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument("--json", action="store_true", default=defaults, help="print proto3 JSON, not tables")
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=defaults,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:.0f})",
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--original-topic", help="only records that came from this topic")
    parser.add_argument("--error-class", help="only records with this error class")
    parser.add_argument("--key", help="only records with exactly this key (UTF-8)")
    parser.add_argument("--since", type=_rfc3339, help="failed at or after (RFC 3339)")
    parser.add_argument("--until", type=_rfc3339, help="failed before (RFC 3339)")
    parser.add_argument("--state", type=str.upper, choices=STATES, help="only records in this state")


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(value: str) -> float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {value}")
        return number

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _rfc3339(value: str) -> timestamp_pb2.Timestamp:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {value!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a UTC offset (Z or +hh:mm): {value!r}")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def _dead_letter_id(value: str) -> tuple[str, int, int]:
    """(DLT topic, partition, offset) of `<dlt_topic>:<partition>:<offset>` (topic names hold no ':')."""
    rest, _, offset = value.rpartition(":")
    topic, _, partition = rest.rpartition(":")
    if not topic or not partition.isdecimal() or not offset.isdecimal():
        raise argparse.ArgumentTypeError(f"not a dead letter id <dlt_topic>:<partition>:<offset>: {value!r}")
    return topic, int(partition), int(offset)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The List/Reprocess filter fields the arguments set."""
    given = {
        "original_topic": args.original_topic,
        "error_class": args.error_class,
        "key": None if args.key is None else args.key.encode(),
        "since": args.since,
        "until": args.until,
        "state": None if args.state is None else pb.DeadLetterState.Value(f"DEAD_LETTER_STATE_{args.state}"),
    }
    return {name: value for name, value in given.items() if value is not None}


# --- Running -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ui:
    """Where output goes: tables to `out` (stdout), progress and errors to `err` (stderr)."""

    out: Console
    err: Console
    json: bool
    timeout: float

    def emit(self, message: Message) -> None:
        """Print a message's proto3 JSON (zero values included, so scripts find every field)."""
        print(json_format.MessageToJson(message, always_print_fields_with_no_presence=True), flush=True)

    def rows(self, table: Table) -> None:
        """Print a table of records at its natural width: rich would fold it to the terminal (or to 80
        columns in a pipe) until cells are unreadable; one line per record also suits grep."""
        natural = Measurement.get(self.out, self.out.options.update_width(UNBOUNDED), table).maximum
        width = self.out.width
        self.out.width = max(width, natural)
        try:
            self.out.print(table)
        finally:
            self.out.width = width

    def error(self, text: str) -> None:
        self.err.print(Text.assemble(("error:", "bold red"), " ", text), soft_wrap=True)


def run_dlt(args: argparse.Namespace) -> int:
    """Run one `kpg dlt` command; gateway errors are printed, exit code 1."""
    if args.action == "reprocess" and args.ids and _filters(args):
        args.parser.error("select by --id or by filters, not both")
    ui = Ui(Console(), Console(stderr=True), args.json, args.timeout)

    async def call() -> int:
        async with GatewayClient(args.target) as kpg:
            result: int = await args.run(kpg, args, ui)
            return result

    try:
        return asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        _report(ui, exc, args.target)
        return EXIT_FAILED
    except KeyboardInterrupt:
        ui.error("interrupted")
        return EXIT_INTERRUPTED


def _report(ui: Ui, exc: grpc.aio.AioRpcError, target: str) -> None:
    details = error_details(exc)
    if details.code is grpc.StatusCode.UNAVAILABLE and not details.reason:
        ui.error(f"cannot reach the gateway at {target} ({details.message}); set --target or KPG_TARGET")
    elif details.code is grpc.StatusCode.DEADLINE_EXCEEDED and not details.reason:
        ui.error(f"the gateway at {target} did not answer within {ui.timeout:g}s (--timeout)")
    else:
        ui.error(f"{details.reason or details.code.name}: {details.message}")
    for name, description in details.field_violations.items():
        ui.err.print(f"  {name}: {description}", markup=False, highlight=False, soft_wrap=True)


# --- Commands ------------------------------------------------------------------------------------------


async def topics(kpg: GatewayClient, args: argparse.Namespace, ui: Ui) -> int:
    """List the topics ending in .DLT with their partition and record counts."""
    answer = await kpg.dead_letters.ListDeadLetterTopics(pb.ListDeadLetterTopicsRequest(), timeout=ui.timeout)
    if ui.json:
        ui.emit(answer)
        return 0
    table = Table("topic", Column("partitions", justify="right"), Column("records", justify="right"))
    for topic in answer.topics:
        table.add_row(Text(topic.topic), str(topic.partitions), str(topic.record_count))
    ui.rows(table)
    return 0


async def list_dead_letters(kpg: GatewayClient, args: argparse.Namespace, ui: Ui) -> int:
    """List the dead letters of DLT_TOPIC that match every filter given, one page (or --all pages)."""
    request = pb.ListDeadLettersRequest(
        dlt_topic=args.dlt_topic, limit=args.limit, page_token=args.page_token, **_filters(args)
    )
    answer = await kpg.dead_letters.ListDeadLetters(request, timeout=ui.timeout)
    while args.all and answer.next_page_token:
        request.page_token = answer.next_page_token
        page = await kpg.dead_letters.ListDeadLetters(request, timeout=ui.timeout)
        answer.dead_letters.extend(page.dead_letters)
        answer.next_page_token = page.next_page_token
    if ui.json:
        ui.emit(answer)
        return 0
    table = Table(
        "id",
        "state",
        "format",
        "original",
        "error class",
        Column("error message", max_width=MESSAGE_WIDTH, no_wrap=True, overflow="ellipsis"),
        Column("replays", justify="right"),
        "failed at",
    )
    for letter in answer.dead_letters:
        table.add_row(
            Text(letter.id),
            _state(letter.state),
            _format(letter.format),
            Text(_original(letter)),
            Text(letter.error_class),
            Text(letter.error_message.splitlines()[0] if letter.error_message else ""),
            str(letter.reprocess_count),
            _time(letter, "failed_at", timespec="seconds"),
        )
    ui.rows(table)
    if answer.next_page_token:
        ui.out.print(f"next page: --page-token {answer.next_page_token}", markup=False, soft_wrap=True)
    return 0


async def show(kpg: GatewayClient, args: argparse.Namespace, ui: Ui) -> int:
    """Show every field of one dead letter: its failure, headers, payload and stack trace."""
    topic, partition, offset = args.id
    letter = await kpg.dead_letters.GetDeadLetter(
        pb.GetDeadLetterRequest(dlt_topic=topic, partition=partition, offset=offset), timeout=ui.timeout
    )
    if ui.json:
        ui.emit(letter)
        return 0
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for name, value in [
        ("id", letter.id),
        ("state", _state(letter.state)),
        ("format", _format(letter.format)),
        ("key", _bytes(letter.key)),
        ("original", _original(letter)),
        ("original timestamp", _time(letter, "original_timestamp")),
        ("consumer group", letter.consumer_group),
        ("error class", letter.error_class),
        ("error message", letter.error_message),
        ("attempts", str(letter.attempts)),
        ("failed at", _time(letter, "failed_at")),
        ("reprocess count", str(letter.reprocess_count)),
    ]:
        fields.add_row(name, Text(value))
    ui.out.print(fields)
    headers = Table("header", "value", title="headers", title_justify="left")
    for name, raw in sorted(letter.headers.items()):
        headers.add_row(Text(name), Text(_bytes(raw)))
    ui.out.print(headers)
    payload = _printable(letter.payload)
    ui.out.print(Text("payload" + (" (base64)" if payload is None else ""), style="bold"))
    ui.out.print(Text(base64.b64encode(letter.payload).decode() if payload is None else payload))
    if letter.stack_trace:
        ui.out.print(Text("stack trace", style="bold"))
        ui.out.print(Text(letter.stack_trace))
    return 0


async def reprocess(kpg: GatewayClient, args: argparse.Namespace, ui: Ui) -> int:
    """Send dead letters of DLT_TOPIC back to their original topic (or --target-topic), each at most once
    unless --force. With --id, those; otherwise the ones matching the filters (NEW ones unless --force or
    --state), collected before anything is sent. Exit code 1 if any could not be sent."""
    ids = list(dict.fromkeys(args.ids)) if args.ids else await _collect(kpg, args, ui)
    totals = pb.ReprocessResponse()
    if not ids:
        ui.err.print(f"nothing to reprocess in {args.dlt_topic}", markup=False, highlight=False)
    verb = "counting" if args.dry_run else "reprocessing"
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=ui.err,
    )
    try:
        with progress:
            task = progress.add_task(f"{verb} {args.dlt_topic}", total=len(ids), visible=bool(ids))
            for batch in _chunks(ids, args.batch):
                request = pb.ReprocessRequest(
                    dlt_topic=args.dlt_topic,
                    ids=batch,
                    target_topic=args.target_topic,
                    dry_run=args.dry_run,
                    force=args.force,
                )
                answer = await kpg.dead_letters.Reprocess(request, timeout=ui.timeout)
                for name in ("selected", "reprocessed", "skipped", "failed"):
                    setattr(totals, name, getattr(totals, name) + getattr(answer, name))
                progress.advance(task, len(batch))
    except grpc.aio.AioRpcError:
        if totals.selected:
            ui.err.print(f"stopped after {totals.selected} of {len(ids)} dead letters:")
            _summary(totals, args, out=ui.err)
        raise
    if ui.json:
        ui.emit(totals)
    else:
        _summary(totals, args, out=ui.out)
    return 0 if totals.failed == 0 else EXIT_FAILED


async def _collect(kpg: GatewayClient, args: argparse.Namespace, ui: Ui) -> list[str]:
    """The ids of the dead letters the filters select, as the DLT is now."""
    filters = _filters(args)
    if args.state is None and not args.force:
        filters["state"] = pb.DEAD_LETTER_STATE_NEW
    request = pb.ListDeadLettersRequest(dlt_topic=args.dlt_topic, **filters)
    ids: list[str] = []
    with ui.err.status(f"scanning {args.dlt_topic}") as status:
        while True:
            page = await kpg.dead_letters.ListDeadLetters(request, timeout=ui.timeout)
            ids += [letter.id for letter in page.dead_letters]
            status.update(f"scanning {args.dlt_topic}: {len(ids)} found")
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
    ui.err.print(f"{len(ids)} dead letters selected in {args.dlt_topic}", markup=False, highlight=False)
    return ids


def _summary(totals: pb.ReprocessResponse, args: argparse.Namespace, *, out: Console) -> None:
    title = f"{args.dlt_topic} → {args.target_topic or 'original topics'}"
    out.print(
        Text(title + (" (dry run: nothing sent)" if args.dry_run else ""), style="bold"), soft_wrap=True
    )
    table = Table(
        *(Column(name, justify="right") for name in ("selected", "reprocessed", "skipped", "failed"))
    )
    table.add_row(str(totals.selected), str(totals.reprocessed), str(totals.skipped), str(totals.failed))
    out.print(table)


async def discard(kpg: GatewayClient, args: argparse.Namespace, ui: Ui) -> int:
    """Mark dead letters of DLT_TOPIC as discarded, with a --reason, so they are no longer reprocessed."""
    answer = await kpg.dead_letters.Discard(
        pb.DiscardRequest(dlt_topic=args.dlt_topic, ids=args.ids, reason=args.reason), timeout=ui.timeout
    )
    if ui.json:
        ui.emit(answer)
    else:
        before = len(set(args.ids)) - answer.discarded
        ui.out.print(f"discarded {answer.discarded}" + (f" ({before} already discarded)" if before else ""))
    return 0


# --- Formatting ----------------------------------------------------------------------------------------


def _chunks(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def _state(value: pb.DeadLetterState.ValueType) -> str:
    return str(pb.DeadLetterState.Name(value)).removeprefix("DEAD_LETTER_STATE_")


def _format(value: pb.DeadLetterFormat.ValueType) -> str:
    return str(pb.DeadLetterFormat.Name(value)).removeprefix("DEAD_LETTER_FORMAT_")


def _original(letter: pb.DeadLetter) -> str:
    if not letter.original_topic:
        return ""
    partition = "?" if letter.original_partition < 0 else letter.original_partition
    offset = "?" if letter.original_offset < 0 else letter.original_offset
    return f"{letter.original_topic}[{partition}]@{offset}"


def _time(
    letter: pb.DeadLetter, name: Literal["failed_at", "original_timestamp"], *, timespec: str = "milliseconds"
) -> str:
    if not letter.HasField(name):
        return ""
    stamp: timestamp_pb2.Timestamp = getattr(letter, name)
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _printable(raw: bytes) -> str | None:
    """`raw` as text if it is printable UTF-8 (line breaks and tabs allowed), else None."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return text if all(c.isprintable() or c in "\n\r\t" for c in text) else None


def _bytes(raw: bytes) -> str:
    """Printable UTF-8 as text, anything else as 0x-prefixed hex."""
    text = _printable(raw)
    return text if text is not None else f"0x{raw.hex()}"
