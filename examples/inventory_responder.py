"""An inventory service answering the gateway's request-reply calls on `inventory.requests` (allowed in
examples/definitions.yaml). With `make run` in another terminal:

    .venv/bin/python examples/inventory_responder.py
    curl -s -XPOST 127.0.0.1:8080/v1/requests/inventory.requests -d '{"payload": {"sku": "apple"}}'
"""

from __future__ import annotations

import asyncio
import json
import os

from kpg.responder import IncomingRequest, Response, serve_requests

STOCK = {"apple": 12, "pear": 0}


async def availability(request: IncomingRequest) -> Response:
    try:
        sku = str(json.loads(request.payload or b"{}").get("sku", ""))
    except (ValueError, AttributeError):
        body: dict[str, object] = {"error": 'send JSON like {"sku": "apple"}'}
    else:
        body = {"sku": sku, "available": STOCK.get(sku, 0)}
    return Response(json.dumps(body).encode(), headers={"content-type": "application/json"})


async def main(bootstrap: str) -> None:
    """Answer until stopped; print `ready` once it has its partitions (it sees requests sent after that)."""
    ready = asyncio.Event()
    serving = asyncio.create_task(
        serve_requests("inventory.requests", availability, bootstrap_servers=bootstrap, ready=ready)
    )
    await asyncio.wait({serving, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        print("ready", flush=True)
    await serving


if __name__ == "__main__":
    bootstrap = os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    print(f"answering inventory.requests on {bootstrap} (Ctrl-C stops)", flush=True)
    asyncio.run(main(bootstrap))
