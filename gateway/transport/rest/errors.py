"""The FastAPI side of the contract's error table: one body shape for every failure."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gateway.errors import FieldViolation, GatewayError, InvalidArgument, NotFound, Reason

log = logging.getLogger(__name__)


def error_body(error: GatewayError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": error.reason.http_status,
        "status": error.reason.grpc_code,
        "reason": error.reason.name,
        "message": error.message,
        "metadata": error.metadata,
    }
    if error.violations:
        body["fieldViolations"] = [{"field": v.field, "description": v.description} for v in error.violations]
    return {"error": body}


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.reason.http_status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        violations = tuple(
            FieldViolation(".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0]), str(err["msg"]))
            for err in exc.errors()
        )
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return error_response(InvalidArgument(message or "invalid request", violations=violations))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error: GatewayError = NotFound(f"no route {request.method} {request.url.path}")
        else:
            error = GatewayError(str(exc.detail), reason=Reason.INVALID_ARGUMENT)
        response = error_response(error)
        if exc.status_code != 404:
            response.status_code = exc.status_code
            response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        body = {
            "error": {
                "code": 500,
                "status": "INTERNAL",
                "reason": "INTERNAL",
                "message": "internal error; see the gateway log",
                "metadata": {},
            }
        }
        return JSONResponse(body, status_code=500)
