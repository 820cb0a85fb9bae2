"""The first call of clients/python/README.md, runnable: append an event, then read your own write from the
`order_summary` read model, once with the blocking client and once with the asyncio one. With `make run`:

    .venv/bin/python clients/python/examples/first_call.py      # KPG_TARGET=host:port for another gateway
"""

from __future__ import annotations

import asyncio
import os

import kpg

TARGET = os.environ.get("KPG_TARGET", "127.0.0.1:50051")


def blocking() -> None:
    with kpg.Client(TARGET) as client:
        placed = kpg.Event("OrderPlaced", {"customer": "c-1", "total": 42})
        written = client.append("orders", "order-1", [placed])
        summary = client.get("order_summary", "order-1", min_position=written.position)
        print(summary.data)  # {'total': 42, 'customer': 'c-1', 'status': 'PLACED'}


async def concurrent() -> None:
    async with kpg.AsyncClient(TARGET) as client:
        placed = kpg.Event("OrderPlaced", {"customer": "c-2", "total": 7})
        written = await client.append("orders", "order-2", [placed])
        summary = await client.get("order_summary", "order-2", min_position=written.position)
        print(summary.data)  # {'total': 7, 'customer': 'c-2', 'status': 'PLACED'}


if __name__ == "__main__":
    blocking()
    asyncio.run(concurrent())
