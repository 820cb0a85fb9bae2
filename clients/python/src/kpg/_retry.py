"""When a failed call is tried again, and after how long; shared by the sync and the asyncio client.

Only calls that are safe to send twice are retried: reads, and writes carrying an idempotency key (the
client fixes one before the first attempt). Retried: UNAVAILABLE (the gateway or its backend), RATE_LIMITED
(after at least the gateway's `retry_after_ms`) and IDEMPOTENCY_KEY_IN_FLIGHT (an earlier attempt of this
very call is still running). Every pause ends before the call's deadline, or the last error is raised.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from kpg.errors import IdempotencyKeyInFlight, KpgError, RateLimited, Unavailable

_RETRYABLE = (Unavailable, RateLimited, IdempotencyKeyInFlight)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to `retries` retries after the first attempt, pausing `initial_backoff` seconds, doubling up to
    `max_backoff`, each pause drawn from [half, all] of that (jitter)."""

    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def pause(self, failures: int, error: KpgError) -> float:
        """Seconds to wait after the `failures`-th consecutive failure."""
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** (failures - 1))
        pause = random.uniform(ceiling / 2, ceiling)
        if isinstance(error, RateLimited) and error.retry_after_ms is not None:
            pause = max(pause, error.retry_after_ms / 1000)
        return pause


class Attempts:
    """The attempts of one call: its deadline (monotonic seconds, None: none) and its failures so far."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, *, safe_to_retry: bool) -> None:
        self.policy = policy
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.safe_to_retry = safe_to_retry
        self.failures = 0

    def remaining(self) -> float | None:
        """Seconds left before the deadline (at least a millisecond), None without one."""
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())

    def pause_after(self, error: KpgError) -> float | None:
        """The pause before trying again after `error`, or None when `error` must be raised."""
        if not (self.safe_to_retry and isinstance(error, _RETRYABLE)) or self.failures >= self.policy.retries:
            return None
        self.failures += 1
        pause = self.policy.pause(self.failures, error)
        if self.deadline is not None and time.monotonic() + pause >= self.deadline:
            return None
        return pause

    def succeeded(self) -> None:
        """A stream delivered a message: later failures count from zero again."""
        self.failures = 0
