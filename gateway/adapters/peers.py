"""Calls between the worker processes of one `kpg serve --workers N`, over unix sockets.

A worker hands work another worker owns to it (an append to a partition whose writer lives there), so
that the workers do not take a partition's writer from each other. Invariants:
- **Sent or not, never unsure before sending.** `call` raises `PeerUnreachable` only when the request
  was not sent (no connection): the caller may then do the work itself. Once sent, a lost connection or
  a timeout is a `BackendUnavailable` whose outcome is unknown, as with a gateway that crashed mid-call.
- **Concurrent calls stay concurrent.** Calls share one connection per peer and the server answers each
  in a task of its own, so forwarded appends batch in the owner's writer like its own callers' appends.
- **Errors arrive as they were raised:** a `GatewayError` comes back with its class, reason, message
  and metadata, and the transport maps it as if it had been raised here.
- **Same user only.** The sockets live in the supervisor's private folder (mode 0700). Payloads are
  pickled (both ends are the same build), and unpickling admits only the gateway's records and errors.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import pickle
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway import errors
from gateway.errors import BackendUnavailable, GatewayError
from gateway.tasks import raise_if_cancelling, stop_task

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any]]
_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024
_RETRY_CONNECT_S = 0.5  # after a failed connect, the peer counts as unreachable this long
_ALLOWED_MODULES = ("gateway.domain.", "gateway.errors")
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float"}


class PeerUnreachable(Exception):
    """The request was not sent: the peer has no socket, or it refused the connection."""


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_MODULES) or (module == "builtins" and name in _SAFE_BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed between workers")


def _dumps(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _loads(body: bytes) -> Any:
    return _Unpickler(io.BytesIO(body)).load()


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes")
    return _loads(await reader.readexactly(size))


def _error_state(error: GatewayError) -> tuple[str, str, dict[str, Any]]:
    return type(error).__name__, error.message, dict(error.__dict__)


def _rebuild_error(name: str, message: str, state: dict[str, Any]) -> GatewayError:
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, GatewayError)):
        cls = GatewayError
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class PeerServer:
    """Answers other workers' calls on this worker's socket: `handlers` by call kind."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self._path = path
        self._handlers = handlers
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)  # left by this worker's previous life
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        os.chmod(self._path, 0o600)

    async def close(self) -> None:
        """Stop accepting, then end the open connections (their calls in flight are cancelled); bounded."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            await stop_task(task, 1.0)
        self._path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    call_id, kind, payload = await _read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                call = asyncio.create_task(self._answer(writer, call_id, kind, payload))
                calls.add(call)
                call.add_done_callback(calls.discard)
        except Exception as exc:
            raise_if_cancelling()
            log.warning("a peer connection failed: %r", exc)
        finally:
            for call in list(calls):
                await stop_task(call, 1.0)
            writer.close()
            self._connections.discard(task)

    async def _answer(self, writer: asyncio.StreamWriter, call_id: int, kind: str, payload: Any) -> None:
        try:
            answer: tuple[Any, ...] = (call_id, True, await self._handlers[kind](payload))
        except GatewayError as error:
            answer = (call_id, False, _error_state(error))
        except Exception as exc:
            raise_if_cancelling()
            log.exception("a forwarded %s call failed", kind)
            answer = (call_id, False, _error_state(BackendUnavailable(f"{kind} failed in its worker: {exc}")))
        if not writer.is_closing():
            writer.write(_dumps(answer))


class Peers:
    """This worker's view of its siblings: who owns a key, and calls to them (see the module doc)."""

    def __init__(self, directory: Path, index: int, count: int) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self._connections: dict[int, _Connection] = {}
        self._unreachable_until: dict[int, float] = {}

    def owner(self, key: str) -> int:
        """The worker that owns `key`: the same answer in every worker, spread evenly."""
        return zlib.crc32(key.encode()) % self.count

    async def call(self, peer: int, kind: str, payload: Any, timeout_s: float) -> Any:
        connection = self._connections.get(peer)
        if connection is None or connection.closed:
            if time.monotonic() < self._unreachable_until.get(peer, 0.0):
                raise PeerUnreachable(f"worker {peer} was unreachable moments ago")
            try:
                connection = await _Connection.open(socket_path(self.directory, peer))
            except OSError as exc:
                self._unreachable_until[peer] = time.monotonic() + _RETRY_CONNECT_S
                raise PeerUnreachable(f"worker {peer}: {exc}") from exc
            self._connections[peer] = connection
        return await connection.call(kind, payload, timeout_s)

    async def close(self) -> None:
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._receiver = asyncio.create_task(self._receive(), name="peer-receiver")
        self.closed = False

    @classmethod
    async def open(cls, path: Path) -> _Connection:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def call(self, kind: str, payload: Any, timeout_s: float) -> Any:
        if self.closed:
            raise PeerUnreachable("the connection to the worker is closed")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            self._writer.write(_dumps((call_id, kind, payload)))
            async with asyncio.timeout(timeout_s):
                ok, value = await future
        except TimeoutError:
            raise BackendUnavailable(
                f"no answer from the worker that owns it within {timeout_s:g}s: it may or may not have "
                "been done (retry with the same idempotency key)"
            ) from None
        finally:
            self._waiting.pop(call_id, None)
        if ok:
            return value
        raise _rebuild_error(*value)

    async def _receive(self) -> None:
        error: BaseException = BackendUnavailable(
            "the worker that owns it went away: it may or may not have been done "
            "(retry with the same idempotency key)"
        )
        try:
            while True:
                call_id, ok, value = await _read_frame(self._reader)
                future = self._waiting.get(call_id)
                if future is not None and not future.done():
                    future.set_result((ok, value))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:
            raise_if_cancelling()
            log.warning("a peer connection failed: %r", exc)
        finally:
            self.closed = True
            self._writer.close()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        await stop_task(self._receiver, 1.0)
