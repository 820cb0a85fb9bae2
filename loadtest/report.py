"""What loadtest/bench.py prints and writes: the table of rows, each ratio next to its target from issue 12
(printed, never asserted), the JSON figures and a chart (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.measure import Row
from loadtest.support import figure

CPU_COLUMNS = ("server", "broker", "redis", "helpers", "harness")


@dataclass
class Results:
    rows: list[Row]
    notes: list[str]
    spread: dict[str, dict[int, int]]  # gateway / grpc-noop -> connections per worker pid
    pids: dict[str, int | None]
    setup: dict[str, Any] = field(default_factory=dict)

    def find(self, pattern: str, path: str) -> Row | None:
        return next((r for r in self.rows if r.pattern == pattern and r.path == path), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "setup": self.setup,
            "pids": self.pids,
            "connections_per_worker": {k: {str(p): n for p, n in v.items()} for k, v in self.spread.items()},
            "rows": [row.to_json() for row in self.rows],
            "targets": [t.to_json() for t in targets(self)],
            "ratios": [t.to_json() for t in other_ratios(self)],
            "gateway_cpu_ms_per_s_during_references": figure(idle_gateway_cpu(self.rows), 1),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Target:
    what: str
    value: float  # the ratio, or the figure compared
    shown: str  # how the value reads, e.g. "0.42x", "13.1 ms"
    target: str  # e.g. ">= 0.5x"
    met: bool | None  # None: no target (a ratio printed for reading)

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "value": figure(self.value, 3), "target": self.target, "met": self.met}


def _server_cpu(row: Row) -> float:
    return row.cpu_us_per_unit(row.server) if row.server else math.nan


def _cpu(row: Row, column: str) -> float:
    return _server_cpu(row) if column == "server" else row.cpu_us_per_unit(column)


def idle_gateway_cpu(rows: list[Row]) -> float:
    """The gateway's CPU (ms per second) while reference rows ran: what it spends without calls."""
    references = [r for r in rows if r.side == "reference" and "gateway" in r.cpu_s]
    seconds = sum(r.seconds for r in references)
    return 1000 * sum(r.cpu_s["gateway"] for r in references) / seconds if seconds else math.nan


def _ratio(
    results: Results,
    what: str,
    a: tuple[str, str],
    b: tuple[str, str],
    *,
    of: Callable[[Row], float] = lambda r: r.rate,
    at_least: float | None = None,
    at_most: float | None = None,
) -> Target | None:
    first, second = results.find(*a), results.find(*b)
    if first is None or second is None:
        return None
    value = of(first) / of(second) if of(second) else math.nan
    if at_least is not None:
        return Target(what, value, f"{value:.3f}x", f">= {at_least}x", value >= at_least)
    if at_most is not None:
        return Target(what, value, f"{value:.3f}x", f"<= {at_most}x", value <= at_most)
    return Target(what, value, f"{value:.3f}x", "", None)


def targets(results: Results) -> list[Target]:
    """Issue 12's targets, each with what was measured."""
    found: list[Target | None] = []
    batches = next((r.pattern for r in results.rows if r.pattern.endswith("-event batches")), "")
    found.append(
        _ratio(
            results,
            f"{batches or 'append batches'}: gateway / raw produce with a callback per record (acks=all, "
            "idempotent)",
            (batches, "gateway gRPC"),
            (batches, "raw produce, callback per record"),
            at_least=0.5,
        )
    )
    found.append(
        _ratio(
            results,
            "append 1 event: gateway / do-nothing grpc.aio handler (same workers, callers)",
            ("append 1 event", "gateway gRPC"),
            ("append 1 event", "do-nothing grpc.aio"),
            at_least=0.65,
        )
    )
    half = "request-reply, half peak"
    gateway = results.find(half, "gateway gRPC Request")
    bare = results.find(half, "bare produce -> responder -> consume")
    if gateway is not None and bare is not None:
        limit = bare.p(0.5) + 2
        found.append(
            Target(
                f"request-reply p50 at half peak ({gateway.load}): gateway vs bare round trip p50 "
                f"{bare.p(0.5):.2f} ms + 2 ms",
                gateway.p(0.5),
                f"{gateway.p(0.5):.2f} ms",
                f"<= {limit:.2f} ms",
                gateway.p(0.5) <= limit,
            )
        )
    found.append(
        _ratio(
            results,
            f"request-reply p99 at half peak: gateway / bare round trip (bare p99 {bare.p(0.99):.2f} ms)"
            if bare is not None
            else "request-reply p99 at half peak",
            (half, "gateway gRPC Request"),
            (half, "bare produce -> responder -> consume"),
            of=lambda r: r.p(0.99),
            at_most=1.5,
        )
    )
    found.append(
        _ratio(
            results,
            "REST bridge / gRPC, append 1 event",
            ("append 1 event (REST)", "gateway REST"),
            ("append 1 event", "gateway gRPC"),
            at_least=0.7,
        )
    )
    found.append(
        _ratio(
            results,
            "REST bridge / gRPC, read-model Get",
            ("read-model Get (REST)", "gateway REST"),
            ("read-model Get", "gateway gRPC"),
            at_least=0.7,
        )
    )
    lag = next((r for r in results.rows if r.pattern == "lag at half peak append rate"), None)
    if lag is not None:
        for name, key in (("projection", "projection_lag_ms_p99"), ("stream index", "index_lag_ms_p99")):
            value = float(lag.extra[key])
            found.append(
                Target(
                    f"{name} lag p99 at half the peak append rate ({lag.load}; append answered -> "
                    f"{'Get' if name == 'projection' else 'ReadStream'}(min_position) answered)",
                    value,
                    f"{value:.1f} ms",
                    "< 1000 ms",
                    value < 1000,
                )
            )
    read = results.find("ReadStream after append", "gateway gRPC (AppendEvents, then ReadStream)")
    if read is not None:
        found.append(
            Target(
                f"ReadStream right after an append, p50 ({read.load})",
                read.p(0.5),
                f"{read.p(0.5):.2f} ms",
                "< 20 ms",
                read.p(0.5) < 20,
            )
        )
    get = results.find("read-model Get", "gateway gRPC")
    if get is not None:
        workers = results.setup.get("workers", 1)
        found.append(
            Target(
                f"read-model Get throughput ({get.load}, {workers} worker{'s' if workers != 1 else ''})",
                get.rate,
                f"{get.rate:,.0f}/s",
                ">= 5,000/s",
                get.rate >= 5000,
            )
        )
    return [t for t in found if t is not None]


def other_ratios(results: Results) -> list[Target]:
    """Every other gateway / reference pair, printed for reading (no target)."""
    batches = next((r.pattern for r in results.rows if r.pattern.endswith("-event batches")), "")
    pairs: list[Target | None] = [
        _ratio(
            results,
            "append 1 event (REST): gateway / do-nothing FastAPI",
            ("append 1 event (REST)", "gateway REST"),
            ("append 1 event (REST)", "do-nothing FastAPI"),
        ),
        _ratio(
            results,
            f"{batches}: gateway / raw produce without callbacks",
            (batches, "gateway gRPC"),
            (batches, "raw produce, no callbacks"),
        ),
        _ratio(
            results,
            "ReadStream after append, p50: gateway / bare produce -> consume",
            ("ReadStream after append", "gateway gRPC (AppendEvents, then ReadStream)"),
            ("ReadStream after append", "bare produce (acked), then consumed"),
            of=lambda r: r.p(0.5),
        ),
        _ratio(
            results,
            "read-model Get: gateway / do-nothing grpc.aio",
            ("read-model Get", "gateway gRPC"),
            ("read-model Get", "do-nothing grpc.aio"),
        ),
        _ratio(
            results,
            "read-model Query: gateway / do-nothing grpc.aio",
            ("read-model Query (EQ, limit 20)", "gateway gRPC"),
            ("read-model Query (EQ, limit 20)", "do-nothing grpc.aio"),
        ),
        _ratio(
            results,
            "read-model Get (REST): gateway / do-nothing FastAPI",
            ("read-model Get (REST)", "gateway REST"),
            ("read-model Get (REST)", "do-nothing FastAPI"),
        ),
        _ratio(
            results,
            "request-reply peak throughput: gateway / bare round trip",
            ("request-reply, peak", "gateway gRPC Request"),
            ("request-reply, peak", "bare produce -> responder -> consume"),
        ),
        _ratio(
            results,
            "request-reply p50 at half peak: gateway / bare round trip",
            ("request-reply, half peak", "gateway gRPC Request"),
            ("request-reply, half peak", "bare produce -> responder -> consume"),
            of=lambda r: r.p(0.5),
        ),
    ]
    saga = next((r.pattern for r in results.rows if r.pattern.startswith("saga")), "")
    pairs += [
        _ratio(
            results,
            f"{saga}: gateway / bare round trips, throughput",
            (saga, "gateway gRPC (StartSaga, WatchSaga)"),
            (saga, "bare round trips (command, reply)"),
        ),
        _ratio(
            results,
            f"{saga}: gateway / bare round trips, p50",
            (saga, "gateway gRPC (StartSaga, WatchSaga)"),
            (saga, "bare round trips (command, reply)"),
            of=lambda r: r.p(0.5),
        ),
    ]
    copies = [r.path for r in results.rows if r.pattern == "DLT reprocess" and r.side == "reference"]
    pairs += [
        _ratio(
            results,
            f"DLT reprocess: gateway / {path}",
            ("DLT reprocess", "gateway gRPC Reprocess"),
            ("DLT reprocess", path),
        )
        for path in copies
    ]
    return [t for t in pairs if t is not None]


def _num(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def report(results: Results) -> str:
    setup = results.setup
    lines = [
        f"Kafka Pattern Gateway benchmark, {setup.get('started_at', '')}: {setup.get('cpus')} CPUs, "
        f"gateway workers {setup.get('workers')} (and as many do-nothing servers), "
        f"{setup.get('seconds_per_row')} s per row after {setup.get('warmup_s')} s of warm-up, "
        f"{setup.get('channels')} gRPC channels; broker {setup.get('bootstrap_servers')} "
        f"(pid {results.pids.get('broker')}), Redis {setup.get('redis_url')} "
        f"(pid {results.pids.get('redis')}); "
        f"load average at the end {setup.get('load_average_at_end')}",
        "",
        f"{'pattern':32s} {'path':46s} {'load':20s} {'throughput':>20s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'errors':>6s}  CPU us per unit: " + " ".join(f"{c:>7s}" for c in CPU_COLUMNS),
    ]
    previous = ""
    for row in results.rows:
        pattern = row.pattern if row.pattern != previous else ""
        previous = row.pattern
        throughput = f"{_num(row.rate, 0)} {row.unit}/s"
        lines.append(
            f"{pattern:32s} {row.path:46s} {row.load:20s} {throughput:>20s} {_num(row.p(0.5), 2):>8s} "
            f"{_num(row.p(0.99), 2):>8s} {sum(row.errors.values()):6d}  {'':17s}"
            + " ".join(f"{_num(_cpu(row, c), 0):>7s}" for c in CPU_COLUMNS)
        )
    lines.append(
        "(server: the gateway's process tree for gateway rows, the do-nothing servers for theirs, '-' for "
        "raw Kafka rows, whose client is the harness; helpers: the saga participants and the echo responder)"
    )
    for row in results.rows:
        if row.pattern == "lag at half peak append rate":
            x = row.extra
            lines.append(
                f"lag at {row.load}: read model lag (GetStatus every 0.2 s) p50 "
                f"{_num(x['lag_records_p50'], 0)}, "
                f"p99 {_num(x['lag_records_p99'], 0)}, max {x['lag_records_max']} events; every 10th append "
                f"({x['lag_probes']} probes, {x['lag_probe_failures']} failed): answered -> "
                f"Get(min_position) p50 {_num(x['projection_lag_ms_p50'])} ms, p99 "
                f"{_num(x['projection_lag_ms_p99'])} ms; -> ReadStream(min_position) p50 "
                f"{_num(x['index_lag_ms_p50'])} ms, p99 {_num(x['index_lag_ms_p99'])} ms"
            )
        if "write_and_read_p50_ms" in row.extra:
            lines.append(
                f"{row.pattern}, {row.path}: write and read together p50 "
                f"{_num(row.extra['write_and_read_p50_ms'], 2)} ms, "
                f"p99 {_num(row.extra['write_and_read_p99_ms'], 2)} ms"
            )
    for row in results.rows:
        if row.errors:
            lines.append(f"errors, {row.key}: " + ", ".join(f"{k}: {v}" for k, v in row.errors.items()))
    lines.append(
        "gateway CPU while the reference rows ran (idle): "
        f"{_num(idle_gateway_cpu(results.rows), 0)} ms per second"
    )
    for name, counts in results.spread.items():
        lines.append(f"connections per worker ({name}): {', '.join(str(n) for n in counts.values())}")
    lines += ["", "Targets (issue 12; printed, never asserted):"]
    for target in targets(results):
        verdict = "met" if target.met else "NOT MET"
        lines.append(f"  {verdict:7s}  {target.what}: {target.shown} (target {target.target})")
    lines += ["", "Other ratios:"]
    lines += [f"  {t.what}: {t.shown}" for t in other_ratios(results)]
    if results.notes:
        lines += ["", "Notes:"] + [f"  {note}" for note in results.notes]
    return "\n".join(lines)


def write_chart(results: Results, path: Path) -> None:
    """Throughput (log scale) and p50/p99 latency per pattern, the gateway's rows next to their references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.rows if r.seconds]
    labels = [f"{r.pattern} | {r.path}" for r in rows]
    colours = ["tab:blue" if r.side == "gateway" else "tab:gray" for r in rows]
    positions = list(range(len(rows)))[::-1]
    figure_, (left, right) = plt.subplots(
        1, 2, figsize=(13, 0.32 * len(rows) + 1.6), sharey=True, gridspec_kw={"width_ratios": [1, 1]}
    )
    left.barh(positions, [r.rate if r.rate > 0 else math.nan for r in rows], color=colours)
    left.set_xscale("log")
    left.set_xlabel("throughput per second (log; events, requests, sagas or records)")
    left.set_yticks(positions, labels, fontsize=7)
    p50 = [r.p(0.5) for r in rows]
    p99 = [r.p(0.99) for r in rows]
    right.barh(positions, p50, color=colours, label="p50")
    right.scatter(p99, positions, marker="|", s=120, color="black", label="p99")
    right.set_xscale("log")
    right.set_xlabel("latency, ms (log): bar p50, tick p99")
    right.legend(loc="lower right", fontsize=7)
    for axis in (left, right):
        axis.grid(axis="x", which="both", alpha=0.3)
    setup = results.setup
    figure_.suptitle(
        f"kpg bench {setup.get('started_at', '')}: gateway (blue) vs reference (gray), "
        f"{setup.get('workers')} worker(s), {setup.get('seconds_per_row')} s rows, {setup.get('cpus')} CPUs",
        fontsize=9,
    )
    figure_.tight_layout()
    figure_.savefig(path, dpi=72)
    plt.close(figure_)
