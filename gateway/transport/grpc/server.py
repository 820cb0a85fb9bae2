"""`create_grpc_server`: the asyncio gRPC server with health, reflection and the interceptor chain."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.services.health import BackendMonitor
from gateway.settings import GrpcSettings
from gateway.transport.grpc.interceptors import GatewayInterceptor
from gateway.transport.grpc.servicers import ServiceBinding


async def create_grpc_server(
    settings: GrpcSettings,
    *,
    bindings: Sequence[ServiceBinding],
    monitor: BackendMonitor,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Build and bind the server (port 0 picks a free port); the caller starts and stops it. `reuse_port`:
    share the port with the other workers (`kpg serve --workers`); off otherwise, so that a second gateway
    started on a port in use fails instead of silently taking half of its connections."""
    server = grpc.aio.server(
        interceptors=[GatewayInterceptor()],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    for binding in bindings:
        binding.register(binding.servicer, server)

    # Health: the overall status ("") and each service follow the backends (NOT_SERVING until both answer).
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ["", *(b.full_name for b in bindings)]

    async def follow(ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in names:
            await health_servicer.set(name, status)

    await monitor.subscribe(follow)

    reflection.enable_server_reflection(
        [*(b.full_name for b in bindings), health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    except RuntimeError as exc:  # grpc reports a failed bind this way
        raise OSError(
            f"cannot bind gRPC to {settings.host}:{settings.port}: address in use or not available"
        ) from exc
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.port}: address in use or not available")
    return server, port
