from __future__ import annotations

import socket

from fastapi import FastAPI

from gateway.settings import RestSettings
from gateway.transport.rest import create_rest_server


def test_rest_socket_disables_nagle() -> None:
    # Without TCP_NODELAY every keep-alive response waited ~40 ms for a delayed ACK.
    _, sock, port = create_rest_server(RestSettings(host="127.0.0.1", port=0), FastAPI())
    try:
        assert port > 0
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
