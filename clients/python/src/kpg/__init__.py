"""Python client for the Kafka Pattern Gateway.

`kpg.v1` holds the stubs generated from proto/kpg/v1 (never edited); `kpg.client` is a small typed
wrapper: one channel, one stub per service, and the contract's error details.
"""

from kpg.client import GatewayClient, GatewayErrorDetails, error_details

__all__ = ["GatewayClient", "GatewayErrorDetails", "error_details"]
