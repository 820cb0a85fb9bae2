"""Readiness: the gateway serves only while Kafka and Redis answer.

`BackendMonitor` probes both on an interval, and on the first success runs the start-up work that
needs them (creating the definitions' topics). Listeners (the gRPC health servicer) hear every change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.tasks import stop_task

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]
Listener = Callable[[bool], Awaitable[None]]


@dataclass
class BackendMonitor:
    probes: dict[str, Probe]
    interval_s: float = 2.0
    timeout_s: float = 3.0
    on_first_ready: Callable[[], Awaitable[None]] | None = None
    status: dict[str, bool] = field(default_factory=dict)
    _listeners: list[Listener] = field(default_factory=list)
    _initialised: bool = False
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        return self._initialised and bool(self.status) and all(self.status.values())

    async def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        await listener(self.ready)

    async def check_once(self) -> bool:
        was_ready = self.ready
        results = await asyncio.gather(*(self._probe(name, probe) for name, probe in self.probes.items()))
        for (name, _), ok in zip(self.probes.items(), results, strict=True):
            if self.status.get(name) != ok:
                log.info("backend %s is %s", name, "up" if ok else "DOWN")
            self.status[name] = ok
        if all(results) and not self._initialised:
            try:
                if self.on_first_ready is not None:
                    await self.on_first_ready()
                self._initialised = True
            except Exception:
                log.exception("start-up work failed; retrying on the next check")
        if self.ready != was_ready:
            for listener in self._listeners:
                await listener(self.ready)
            self._changed.set()
            self._changed = asyncio.Event()
        return self.ready

    async def wait_ready(self, timeout_s: float) -> bool:
        async with asyncio.timeout(timeout_s):
            while not self.ready:
                await self._changed.wait()
        return True

    async def _probe(self, name: str, probe: Probe) -> bool:
        try:
            return await asyncio.wait_for(probe(), self.timeout_s)
        except Exception:  # a probe that fails in any way means "not answering"
            return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="backend-monitor")

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Stop checking and report NOT_SERVING, so load balancers drain this instance while it stops."""
        await stop_task(self._task, 2.0)
        was_ready = self.ready
        self._initialised = False
        if was_ready:
            for listener in self._listeners:
                await listener(False)
