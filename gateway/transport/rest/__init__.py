"""The only package that imports fastapi / starlette / uvicorn: the REST bridge over the same services."""

from gateway.transport.rest.app import create_rest_app
from gateway.transport.rest.server import create_rest_server

__all__ = ["create_rest_app", "create_rest_server"]
