"""`create_rest_server`: uvicorn embedded in the gateway's own event loop.

The gateway owns SIGTERM/SIGINT (one graceful stop for gRPC and REST), so uvicorn must not install its
own signal handlers.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

from gateway.settings import RestSettings


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def create_rest_server(
    settings: RestSettings, app: FastAPI, *, reuse_port: bool = False
) -> tuple[EmbeddedServer, socket.socket, int]:
    """Bind the socket now (port 0 picks a free port) so the caller knows the port before serving.
    `reuse_port`: share the port with the other workers (`kpg serve --workers`)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every
    # response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind REST to {settings.host}:{settings.port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    return EmbeddedServer(config), sock, port
