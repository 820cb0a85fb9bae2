"""Locust users for the gateway, over REST and gRPC.

    make up
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s \
        --host http://127.0.0.1:8080

Today they exercise the operations paths (readiness and gRPC health), the baseline every pattern's
RPC is measured against; each pattern adds its users here as it lands.
"""

from __future__ import annotations

import os
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from grpc_health.v1 import health_pb2, health_pb2_grpc
from locust import HttpUser, User, between, task

grpc_gevent.init_gevent()  # let grpc's sync client cooperate with locust's gevent workers

GRPC_TARGET = os.environ.get("KPG_LOADTEST_GRPC_TARGET", "127.0.0.1:50051")


class RestUser(HttpUser):
    wait_time = between(0, 0.01)

    @task
    def readyz(self) -> None:
        self.client.get("/readyz", name="GET /readyz")


class GrpcUser(User):
    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(GRPC_TARGET)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, fn: Any, request: Any) -> None:
        started = time.perf_counter()
        exception: Exception | None = None
        try:
            fn(request, timeout=5)
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=exception,
            context={},
        )

    @task
    def health_check(self) -> None:
        self._call("Health.Check", self.health.Check, health_pb2.HealthCheckRequest())
