"""Logs and Prometheus metrics shared by both transports."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess

REQUESTS = Counter(
    "kpg_requests_total",
    "RPCs handled, by transport, RPC and final status code",
    ["transport", "rpc", "code"],
)
ERRORS = Counter(
    "kpg_request_errors_total",
    "RPCs that failed, by transport, RPC and error reason",
    ["transport", "rpc", "reason"],
)
LATENCY = Histogram(
    "kpg_request_duration_seconds",
    "RPC latency, by transport and RPC",
    ["transport", "rpc"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


GC_PAUSES = Histogram(
    "kpg_gc_pause_seconds",
    "Garbage collections, by generation: every call of the process waits while one runs",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)


async def measure_gc_pauses(publish_every_s: float = 1.0) -> None:
    """Run for the life of the process (cancel to stop): time every collection into GC_PAUSES (a full
    collection of a large heap shows as a latency tail).

    The gc callback runs inside whatever allocation set the collection off, on any thread, possibly while
    that thread holds a lock. prometheus_client's multiprocess values share one non-reentrant lock, and a
    collection set off under it, by a callback that observed the histogram, deadlocked the worker's event
    loop for good (its consumers kept their partitions until max.poll.interval.ms). So the callback takes
    no lock and calls nothing: it appends to a deque (thread-safe and lock-free under the GIL), and this
    task moves what it timed into the histogram from the event loop."""
    timed: deque[tuple[int, float]] = deque(maxlen=10_000)
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            timed.append((info["generation"], time.perf_counter() - started[0]))

    def publish() -> None:
        for _ in range(len(timed)):  # not `while timed`: publishing allocates, and collections append more
            generation, seconds = timed.popleft()
            GC_PAUSES.labels(str(generation)).observe(seconds)

    gc.callbacks.append(callback)
    try:
        while True:
            await asyncio.sleep(publish_every_s)
            publish()
    finally:
        gc.callbacks.remove(callback)
        publish()


# A blocked event loop (a blocking call on it, a deadlock on the GIL) stops every call of the process and
# logs nothing. Past this, every thread's stack is written to stderr, the gateway's log, by faulthandler's
# own thread, which needs neither the loop nor the GIL; once the loop runs again, how long it was blocked
# is logged too.
LOOP_STALL_REPORT_S = 10.0
LOOP_LATE_WARNING_S = 2.0
# A process whose loop stayed blocked this long (a deadlock) ends itself with this code: wedged, it would
# keep its share of the shared ports' connections unanswered and its consumers' partitions unconsumed.
EXIT_LOOP_STALLED = 70

log = logging.getLogger(__name__)


async def report_loop_stalls(stall_s: float = LOOP_STALL_REPORT_S, exit_s: float | None = None) -> None:
    """Run for the life of the process (cancel to stop): arms faulthandler to dump every thread's stack if
    this loop does not come back within `stall_s`, and re-arms it each time it does. With `exit_s`, a
    watchdog thread ends the process (EXIT_LOOP_STALLED, after dumping the stacks again) once the loop has
    not come back for that long: under `kpg serve --workers` the supervisor starts the worker again, and a
    single process is restarted by whatever runs it. The watchdog writes to stderr's file descriptor, not
    through logging, whose locks the blocked thread may hold."""
    loop = asyncio.get_running_loop()
    tick = stall_s / 4
    alive = [time.monotonic()]
    watchdog_stop = threading.Event()
    if exit_s is not None:
        threading.Thread(
            target=_exit_when_stalled, args=(alive, exit_s, watchdog_stop), name="loop-watchdog", daemon=True
        ).start()
    try:
        while True:
            faulthandler.dump_traceback_later(stall_s, file=sys.stderr)
            before = loop.time()
            await asyncio.sleep(tick)
            alive[0] = time.monotonic()
            late = loop.time() - before - tick
            if late >= LOOP_LATE_WARNING_S:
                stacks = " (every thread's stack was written to stderr then)" if late >= stall_s else ""
                log.warning("the event loop was blocked for %.1fs%s", late, stacks)
    finally:
        watchdog_stop.set()
        faulthandler.cancel_dump_traceback_later()


def _exit_when_stalled(alive: list[float], exit_s: float, stop: threading.Event) -> None:
    interval = min(1.0, exit_s / 4)
    checked = time.monotonic()
    while not stop.wait(interval):
        now = time.monotonic()
        if now - checked > interval + 2.0:  # this thread did not run either (SIGSTOP, a frozen VM): a pause
            alive[0] = max(alive[0], now)  # of the whole process, not of its loop; give the loop its time
        checked = now
        blocked = now - alive[0]
        if blocked >= exit_s:
            message = f"the event loop has been blocked for {blocked:.0f}s: exiting ({EXIT_LOOP_STALLED})\n"
            os.write(sys.stderr.fileno(), message.encode())
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            os._exit(EXIT_LOOP_STALLED)


def metrics_registry() -> CollectorRegistry:
    """What `/metrics` shows: this process's metrics, or, under `kpg serve --workers`, every worker's
    added up (the supervisor gives them one `PROMETHEUS_MULTIPROC_DIR`)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def observe(transport: str, rpc: str, code: str, reason: str | None, seconds: float) -> None:
    REQUESTS.labels(transport, rpc, code).inc()
    LATENCY.labels(transport, rpc).observe(seconds)
    if reason is not None:
        ERRORS.labels(transport, rpc, reason).inc()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers expect when the gateway is not on a terminal."""

    _standard = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            {
                k: v
                for k, v in vars(record).items()
                if k not in self._standard and k != "message" and not k.startswith("color_")
            }
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
