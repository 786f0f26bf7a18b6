"""The server daemon: connections, delivery, the helper threads, the HTTP API."""
