"""The only package that imports redis. Lua scripts live in `scripts/` beside it as `.lua` files."""

from gateway.adapters.redis.client import RedisClient, redis_answers

__all__ = ["RedisClient", "redis_answers"]
