"""A real local Kafka broker and Redis server, without Docker, for `make run` and the tests."""

from gateway.devstack.stack import DevStack, StackError, StackInfo

__all__ = ["DevStack", "StackError", "StackInfo"]
