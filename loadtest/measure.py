"""How loadtest/bench.py measures a row: callers in a closed loop (each starts its next operation when the
last one answered) or an open loop (operations started at a fixed rate, latency counted from when each was
due, so a slow answer does not hide the ones queued behind it), the CPU every process spent meanwhile, and a
small keep-alive HTTP/1.1 client that costs the benchmark less CPU than a general one."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from kpg import error_details

from loadtest.support import figure, percentile

OPERATION_TIMEOUT_S = 90.0  # an operation that takes longer is counted as an error (TimeoutError)
Operation = Callable[[int], Awaitable[int]]  # caller (or sequence) number -> units done (events, requests)


@dataclass
class Row:
    """One path measured for one pattern: the gateway's, or its reference's."""

    pattern: str  # what is measured, e.g. "append 1 event"
    path: str  # e.g. "gateway gRPC", "do-nothing grpc.aio"
    side: str  # "gateway" or "reference"
    unit: str  # what throughput counts: "events", "requests", "sagas", "records"
    load: str  # "64 callers", "open loop 250/s"
    server: str | None  # the CPU group that served the row ("gateway", "grpc-noop", ...), None for raw Kafka
    ops: int = 0
    units: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU group -> seconds spent during the row
    extra: dict[str, Any] = field(default_factory=dict)  # figures only this row has (lag, ...)

    @property
    def key(self) -> str:
        return f"{self.pattern} | {self.path}"

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def cpu_us_per_unit(self, group: str) -> float:
        if group not in self.cpu_s or not self.units:
            return math.nan
        return 1e6 * self.cpu_s[group] / self.units

    def to_json(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "path": self.path,
            "side": self.side,
            "load": self.load,
            "unit": self.unit,
            "server": self.server,
            "ops": self.ops,
            "units": self.units,
            "seconds": figure(self.seconds, 3),
            "per_s": figure(self.rate, 1),
            "p50_ms": figure(self.p(0.5), 2),
            "p99_ms": figure(self.p(0.99), 2),
            "errors": dict(self.errors),
            "cpu_s": {name: figure(spent, 4) for name, spent in self.cpu_s.items()},
            "cpu_us_per_unit": {name: figure(self.cpu_us_per_unit(name), 1) for name in self.cpu_s},
            **self.extra,
        }


class CpuMeter:
    """Cumulative CPU seconds of named process groups (the gateway, the broker, ...), read around a row."""

    def __init__(self, groups: Mapping[str, Callable[[], float]]) -> None:
        self._groups = dict(groups)

    def read(self) -> dict[str, float]:
        return {name: read() for name, read in self._groups.items()}

    @staticmethod
    def spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


def describe(exc: Exception) -> str:
    """An error's name for the error counts: the gRPC code and the contract's reason, else its type."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {OPERATION_TIMEOUT_S:.0f} s"
    if isinstance(exc, grpc.aio.AioRpcError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # a call cut short by this task's cancellation
            raise asyncio.CancelledError from exc
        return f"{exc.code().name} {error_details(exc).reason}".strip()
    return f"{type(exc).__name__}: {str(exc)[:80]}"


async def closed_loop(
    row: Row, operation: Operation, *, callers: int, seconds: float, meter: CpuMeter
) -> Row:
    """`callers` callers, each running `operation` again as soon as it answered, for `seconds`."""
    deadline = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(OPERATION_TIMEOUT_S):
                    units = await operation(n)
            except Exception as exc:
                row.errors[describe(exc)] += 1
                continue
            row.latencies_ms.append(1000 * (time.perf_counter() - started))
            row.ops += 1
            row.units += units

    before = meter.read()
    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    row.seconds = time.perf_counter() - started
    row.cpu_s = CpuMeter.spent(before, meter.read())
    return row


async def open_loop(
    row: Row, operation: Operation, *, rate: float, seconds: float, meter: CpuMeter, max_outstanding: int
) -> Row:
    """Start `operation` every 1/rate s for `seconds` (each in its own task); its latency counts from when
    it was due. Beyond `max_outstanding` unanswered operations, one that is due is skipped and counted."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(n: int, due: float) -> None:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_S):
                units = await operation(n)
        except Exception as exc:
            row.errors[describe(exc)] += 1
            return
        row.latencies_ms.append(1000 * (time.perf_counter() - due))
        row.ops += 1
        row.units += units

    before = meter.read()
    started = time.perf_counter()
    n = 0
    while (due := started + n / rate) < started + seconds:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_outstanding:
            row.errors["skipped: too many outstanding"] += 1
        else:
            task = asyncio.create_task(one(n, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        n += 1
    await asyncio.gather(*tasks)
    row.seconds = time.perf_counter() - started
    row.cpu_s = CpuMeter.spent(before, meter.read())
    row.extra["offered_per_s"] = round(rate, 1)
    return row


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        reason = ""
        try:
            reason = json.loads(body)["error"]["reason"]
        except (ValueError, KeyError, TypeError):
            pass
        super().__init__(f"HTTP {status} {reason}".strip())


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, one request at a time (a caller owns it)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)

    async def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The response body of a 2xx answer; anything else raises HttpError."""
        await self.open()
        assert self._reader is not None and self._writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        try:
            status, headers = _parse_head(await self._reader.readuntil(b"\r\n\r\n"))
            if headers.get("transfer-encoding") == "chunked":
                data = await self._chunked()
            else:
                data = await self._reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            await self.close()  # the connection is in an unknown state: the next request opens another
            raise
        if headers.get("connection") == "close":
            await self.close()
        if not 200 <= status < 300:
            raise HttpError(status, data)
        return data

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)
        await self._reader.readuntil(b"\r\n")  # no trailers are sent here
        return b"".join(parts)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    return status, headers
