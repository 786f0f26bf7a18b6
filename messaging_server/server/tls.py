"""TLS for the client port: one server context, built once from the operator's files."""

from __future__ import annotations

import ssl
from typing import Optional

from messaging_server.errors import ConfigurationError


def server_context(cert_file: str, key_file: Optional[str] = None) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or later, the standard library's safe defaults.

    Raises ConfigurationError when the files cannot be read or do not match, so
    the server refuses to start rather than serving in the clear.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation lets a client make the server redo expensive handshakes.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot use TLS certificate {cert_file!r}"
            + (f" with key {key_file!r}" if key_file else "") + f": {exc}") from None
    return context
