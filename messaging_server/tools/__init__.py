"""The operators' tools: ``niki-enqueue`` and ``niki-admin``."""
