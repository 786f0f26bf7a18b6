"""The protocol, pure: the line protocol's state machines and the credential format.
Nothing here touches a socket, a thread or a database."""
