"""The one exception type the codec raises."""

from __future__ import annotations

from lakeproxy.wire import sqlstate


class ProtocolError(Exception):
    """Bytes that are not a valid Postgres message in this context.

    ``sqlstate`` is what a server would answer with (08P01 by default);
    ``str(exc)`` is a short, client-safe description (it never quotes secrets).
    ``reply`` is False when PostgreSQL closes such a connection without a
    reply (an out-of-range startup packet length: postmaster only logs
    "invalid length of startup packet").
    """

    def __init__(
        self, message: str, sqlstate: str = sqlstate.PROTOCOL_VIOLATION, *, reply: bool = True
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.reply = reply
