"""The client side: a blocking Python client (``Client``) and ``niki-client``."""

from messaging_server.client.sdk import Client, ClientError

__all__ = ["Client", "ClientError"]
