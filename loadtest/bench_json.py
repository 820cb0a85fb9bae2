"""What orjson saves on the append path: checking appended events' JSON data, and writing JSON columns.

    .venv/bin/python loadtest/bench_json.py

In one process, no broker: `validate_append` of a 100-event append (the check every appended event goes
through, gateway/domain/events.py `strict_json`: orjson first, json for what orjson refuses) next to the
same check done by json alone, and `json_text` (the JSON columns' serializer) next to `json.dumps`, on an
order-sized document. Prints the best of 5 repeats in µs per event or document; asserts nothing.
"""

from __future__ import annotations

import json
import timeit
import uuid
from collections.abc import Callable
from unittest import mock

from gateway.adapters.sql.database import json_text
from gateway.domain import events
from gateway.domain.events import AppendRequest, Limits, NewEvent, validate_append

ORDER = {
    "orderId": "o-12345",
    "customer": "c-42",
    "items": [{"sku": "A1", "qty": 2, "price": 9.5}, {"sku": "B7", "qty": 1, "price": 20}],
    "total": 39.0,
    "currency": "EUR",
}
EVENTS = 100


def _json_only(text: str | bytes) -> None:
    """The check as it was before orjson: json.loads without NaN and Infinity."""
    json.loads(text, parse_constant=events._no_constant)


def best_us(fn: Callable[[], object], per: int, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number / per * 1e6


def main() -> None:
    data = json.dumps(ORDER).encode()
    request = AppendRequest(
        "orders",
        "order-1",
        tuple(NewEvent(event_id=str(uuid.uuid4()), type="OrderPlaced", data=data) for _ in range(EVENTS)),
    )
    limits = Limits()
    with_orjson = best_us(lambda: validate_append(request, limits), EVENTS, 300)
    with mock.patch.object(events, "strict_json", _json_only):
        json_only = best_us(lambda: validate_append(request, limits), EVENTS, 300)
    print(f"validate_append, {EVENTS}-event append: {with_orjson:.1f} µs per event", end=" ")
    print(f"(json alone: {json_only:.1f})")
    column = best_us(lambda: json_text(ORDER), 1, 20_000)
    dumps = best_us(lambda: json.dumps(ORDER), 1, 20_000)
    print(f"JSON column text of an order document: {column:.2f} µs (json.dumps: {dumps:.2f})")


if __name__ == "__main__":
    main()
