"""Sans-I/O Postgres wire codec for the startup phase.

Nothing in this package imports asyncio, sockets or ssl: it turns bytes into
frozen dataclasses and back, and raises :class:`ProtocolError` (carrying a
SQLSTATE) for anything it cannot accept.
"""
