"""The only package that imports redis. Lua scripts live in `scripts/` beside it as `.lua` files."""

from gateway.adapters.redis.client import RedisClient, redis_answers
from gateway.adapters.redis.stores import (
    Begin,
    BeginOutcome,
    ChangeFeed,
    CorrelationStore,
    IdempotencyStore,
    LeaseStore,
    ReplyLookup,
    ReplyState,
)

__all__ = [
    "Begin",
    "BeginOutcome",
    "ChangeFeed",
    "CorrelationStore",
    "IdempotencyStore",
    "LeaseStore",
    "RedisClient",
    "ReplyLookup",
    "ReplyState",
    "redis_answers",
]
