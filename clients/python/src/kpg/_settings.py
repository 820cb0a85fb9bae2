"""What `AsyncClient` and `Client` are configured with: credentials, metadata sent on every call, the default
deadline and the retry policy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from kpg._retry import RetryPolicy

Tls = bool | grpc.ChannelCredentials | None
MetadataLike = Mapping[str, str] | Iterable[tuple[str, str]] | None

_WAIT_MARGIN_S = 2.0  # beyond the gateway's own wait, so that its answer (e.g. REPLY_TIMEOUT) arrives first


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved options of a client."""

    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    policy: RetryPolicy

    @classmethod
    def build(
        cls,
        *,
        tls: Tls,
        token: str | None,
        metadata: MetadataLike,
        timeout: float | None,
        retries: int,
        initial_backoff: float,
        max_backoff: float,
    ) -> Settings:
        """Settings from a client's keyword arguments (`tls=True`: the system's root certificates)."""
        if tls is True:
            credentials: grpc.ChannelCredentials | None = grpc.ssl_channel_credentials()
        elif isinstance(tls, grpc.ChannelCredentials):
            credentials = tls
        else:
            credentials = None
        pairs = list(metadata.items() if isinstance(metadata, Mapping) else metadata or ())
        if token is not None:
            pairs.append(("authorization", f"Bearer {token}"))
        return cls(
            credentials=credentials,
            metadata=tuple((key.lower(), value) for key, value in pairs),
            timeout=timeout,
            policy=RetryPolicy(retries=retries, initial_backoff=initial_backoff, max_backoff=max_backoff),
        )

    def unary_timeout(self, timeout: float | None, server_wait: float) -> float | None:
        """A unary call's overall deadline in seconds: the one given, else the client's default, made long
        enough for the wait the call asks the gateway for."""
        if timeout is not None:
            return timeout
        if self.timeout is None:
            return None
        return max(self.timeout, server_wait + _WAIT_MARGIN_S) if server_wait else self.timeout
