"""`create_rest_app`: the REST bridge (contract section "REST bridge") plus the operations routes.

Every route calls the same services as gRPC; routes whose pattern has not landed yet answer 501 with
the contract's error body, naming the pattern.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import NotImplementedYet
from gateway.observability import observe
from gateway.services.health import BackendMonitor
from gateway.transport.rest.errors import install_error_handlers

# (method, path, rpc, pattern): the contract's REST routes that later issues implement.
PLANNED_ROUTES: list[tuple[str, str, str, str]] = [
    ("POST", "/v1/sagas", "Sagas.StartSaga", "start-saga"),
    ("GET", "/v1/sagas", "Sagas.ListSagas", "start-saga"),
    ("GET", "/v1/sagas/{saga_id}", "Sagas.GetSaga", "start-saga"),
    ("GET", "/v1/dead-letters", "DeadLetters.ListDeadLetterTopics", "DLT reprocessing"),
    ("GET", "/v1/dead-letters/{dlt_topic}", "DeadLetters.ListDeadLetters", "DLT reprocessing"),
    (
        "GET",
        "/v1/dead-letters/{dlt_topic}/{partition}/{offset}",
        "DeadLetters.GetDeadLetter",
        "DLT reprocessing",
    ),
    ("POST", "/v1/dead-letters/{dlt_topic}/reprocess", "DeadLetters.Reprocess", "DLT reprocessing"),
    ("POST", "/v1/dead-letters/{dlt_topic}/discard", "DeadLetters.Discard", "DLT reprocessing"),
]


def create_rest_app(*, monitor: BackendMonitor, routers: Sequence[APIRouter] = ()) -> FastAPI:
    app = FastAPI(
        title="Kafka Pattern Gateway",
        version="v1",
        description="Event sourcing, CQRS read models, sagas, request-reply and DLT reprocessing on Kafka. "
        "The same API over gRPC is declared in proto/kpg/v1.",
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        # Label by route name (the RPC), never by raw path, so label values stay bounded.
        route = request.scope.get("route")
        rpc = getattr(route, "name", None) or ("unmatched" if response.status_code == 404 else "other")
        failed = response.status_code >= 400
        observe(
            "rest",
            rpc,
            str(response.status_code),
            str(response.status_code) if failed else None,
            time.perf_counter() - started,
        )
        return response

    @app.get("/healthz", tags=["operations"], name="healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process is up and serving HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], name="readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 once Kafka and Redis answer (and start-up work is done), else 503."""
        body = {"ready": monitor.ready, "backends": monitor.status}
        return JSONResponse(body, status_code=200 if monitor.ready else 503)

    @app.get("/metrics", tags=["operations"], name="metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    for method, path, rpc, pattern in PLANNED_ROUTES:
        app.add_api_route(
            path,
            _not_implemented(rpc, pattern),
            methods=[method],
            name=rpc,
            operation_id=rpc,
            tags=[rpc.split(".")[0]],
            summary=f"{rpc} (arrives with {pattern})",
            status_code=200,
            responses={501: {"description": "not implemented yet"}},
        )
    return app


def _not_implemented(rpc: str, pattern: str) -> Callable[[], Awaitable[None]]:
    async def endpoint() -> None:
        raise NotImplementedYet(rpc, pattern)

    return endpoint
