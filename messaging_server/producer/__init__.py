"""The application side: queue messages, into the database (``Enqueuer``) or through a
server's HTTP API (``HttpEnqueuer``)."""
