"""The server's HTTP port: the API, its transport, who may call it, the status page,
the protocol over WebSocket."""
