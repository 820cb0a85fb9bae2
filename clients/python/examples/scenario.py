"""The cross-language scenario (clients/SCENARIO.md) with the typed Python client.

    KPG_TARGET=127.0.0.1:50051 KPG_RUN_ID=$(date +%s) KPG_DLT_ERROR="..." clients/python/scenario.sh

Prints `ok <step>` after each step; on the first deviation it prints what differed on stderr and exits 1.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import kpg

LANG = "python"
CALL_TIMEOUT_S = 30.0
WATCH_TIMEOUT_S = 60.0


class Deviation(Exception):
    """The gateway answered something other than what the scenario says."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Deviation(what)


async def run(target: str, run_id: str, dlt_error: str) -> None:
    stream_id = f"{LANG}-{run_id}"
    async with kpg.AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        # 1. append
        placed = kpg.Event("OrderPlaced", {"customer": f"c-{LANG}", "total": 42})
        appended = await client.append("orders", stream_id, [placed], expected_version=0)
        expect(appended.first_version == 1, f"append: first_version {appended.first_version}, expected 1")
        expect(appended.position != "", "append: empty position")
        print("ok append", flush=True)

        # 2. wrong-expected-version
        try:
            again = await client.append("orders", stream_id, [placed], expected_version=0)
        except kpg.WrongExpectedVersion as exc:
            expect(
                exc.code == grpc.StatusCode.FAILED_PRECONDITION, f"wrong-expected-version: code {exc.code}"
            )
            expect(exc.reason == "WRONG_EXPECTED_VERSION", f"wrong-expected-version: reason {exc.reason}")
            expect(exc.metadata.get("actual") == "1", f"wrong-expected-version: metadata {exc.metadata}")
            expect(exc.actual == 1, f"wrong-expected-version: actual {exc.actual}")
        else:
            raise Deviation(f"wrong-expected-version: the second append succeeded: {again}")
        print("ok wrong-expected-version", flush=True)

        # 3. read-model
        document = await client.get("order_summary", stream_id, min_position=appended.position)
        expect(document.data.get("status") == "PLACED", f"read-model: data {document.data}")
        expect(document.data.get("customer") == f"c-{LANG}", f"read-model: data {document.data}")
        expect(document.data.get("total") == 42, f"read-model: data {document.data}")
        expect(document.version == 1, f"read-model: version {document.version}")
        print("ok read-model", flush=True)

        # 4. request-reply
        reply = await client.request("inventory.requests", {"sku": "apple"}, timeout_ms=10_000)
        expect(reply.status == kpg.ReplyStatus.REPLIED, f"request-reply: status {reply.status}")
        expect(reply.json() == {"sku": "apple", "available": 12}, f"request-reply: payload {reply.payload!r}")
        print("ok request-reply", flush=True)

        # 5. saga
        saga_input = {"sku": "apple", "quantity": 1, "amount": 10, "customer": f"c-{LANG}"}
        await client.start_saga("place_order", saga_input, saga_id=stream_id)
        status = None
        async with client.watch_saga(stream_id, timeout=WATCH_TIMEOUT_S) as snapshots:
            async for saga in snapshots:
                status = saga.status
                expect(
                    status not in (kpg.SagaStatus.FAILED, kpg.SagaStatus.COMPENSATED),
                    f"saga: ended {status}: {saga.failure_reason}",
                )
                if status == kpg.SagaStatus.COMPLETED:
                    break
        expect(status == kpg.SagaStatus.COMPLETED, f"saga: the watch ended at {status}")
        print("ok saga", flush=True)

        # 6. dead-letters (following pages, in case the seeded record is not on the first)
        page_token: str | None = None
        for _ in range(100):
            page = await client.list_dead_letters("orders.events.DLT", page_token=page_token)
            if any(
                d.original_topic == "orders.events" and d.error_message == dlt_error
                for d in page.dead_letters
            ):
                break
            page_token = page.next_page_token
            expect(page_token != "", f"dead-letters: none from orders.events with error {dlt_error!r}")
        else:
            raise Deviation("dead-letters: more than 100 pages")
        print("ok dead-letters", flush=True)


def main() -> int:
    try:
        target, run_id = os.environ["KPG_TARGET"], os.environ["KPG_RUN_ID"]
        dlt_error = os.environ["KPG_DLT_ERROR"]
    except KeyError as missing:
        print(f"FAIL: set {missing.args[0]}", file=sys.stderr)
        return 1
    try:
        asyncio.run(run(target, run_id, dlt_error))
    except Deviation as deviation:
        print(f"FAIL {deviation}", file=sys.stderr)
        return 1
    except kpg.KpgError as error:
        print(f"FAIL {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
