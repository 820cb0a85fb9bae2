"""The only package that imports grpc (and, with transport.rest, the generated *_pb2 modules)."""

from gateway.transport.grpc.server import create_grpc_server

__all__ = ["create_grpc_server"]
