"""`create_rest_app`: the REST bridge (contract section "REST bridge") plus the operations routes.

Every route calls the same services as gRPC. A contract route that no pattern's router serves yet answers
501 with the contract's error body, naming the pattern that brings it (`PLANNED_ROUTES`); once a router
serves that method and path, the placeholder is left out by itself.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import NotImplementedYet, PayloadTooLarge
from gateway.observability import metrics_registry, observe
from gateway.services.health import BackendMonitor
from gateway.transport.rest.errors import error_response, install_error_handlers

# A 4 MiB append travels as base64 or JSON text, which is bigger than 4 MiB: leave room for it.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

# A pattern's REST routes; the composition layer passes them here without importing fastapi itself.
Router: TypeAlias = APIRouter

# (method, path, rpc, pattern): contract routes answering 501 until a pattern's router serves them.
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


def create_rest_app(
    *,
    monitor: BackendMonitor,
    routers: Sequence[Router] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(
        title="Kafka Pattern Gateway",
        version="v1",
        description="Event sourcing, CQRS read models, sagas, request-reply and DLT reprocessing on Kafka. "
        "The same API over gRPC is declared in proto/kpg/v1.",
    )
    install_error_handlers(app)
    # Added before `measure`, so it runs inside it: refused bodies are counted like any other answer.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

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
        body = {"ready": monitor.ready, "backends": monitor.status, "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if monitor.ready else 503)

    registry = metrics_registry()

    @app.get("/metrics", tags=["operations"], name="metrics")
    async def metrics() -> Response:
        """Prometheus metrics (of every worker, under `kpg serve --workers`)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    served = {route for router in routers for route in _routes(router)}
    for method, path, rpc, pattern in PLANNED_ROUTES:
        if (method, _shape(path)) in served:
            continue
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


class BodyLimit:
    """Refuses a request body over `max_bytes` with PAYLOAD_TOO_LARGE before anything parses it: at once
    when Content-Length says so, else as soon as the streamed (chunked) body passes the limit."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if received > self.max_bytes:
                return  # the app's answer to a body cut short is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            # The framework may wrap _BodyTooLarge in an error of its own: what matters is the count.
            if received <= self.max_bytes:
                raise
        if received > self.max_bytes and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(
            f"the request body is larger than {self.max_bytes} bytes",
            metadata={"limit": str(self.max_bytes), "field": "body"},
        )
        await error_response(error)(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised into the app when a streamed body passes the limit; BodyLimit answers for it."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects such a request before it reaches the app
    return None


def _routes(router: Router) -> set[tuple[str, str]]:
    """(method, path shape) of every route the router serves."""
    return {
        (method, _shape(route.path))
        for route in router.routes
        if isinstance(route, Route)
        for method in route.methods or ()
    }


def _shape(path: str) -> str:
    """The path with its parameters unnamed: `/v1/sagas/{id}` serves `/v1/sagas/{saga_id}`."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def _not_implemented(rpc: str, pattern: str) -> Callable[[], Awaitable[None]]:
    async def endpoint() -> None:
        raise NotImplementedYet(rpc, pattern)

    return endpoint
